"""Reading shards (ln_ray/io/shards.py): JSONL line by line, Parquet by row group, bad rows
alone."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from ln_ray.config import ColumnsConfig
from ln_ray.io.canonical import canonical_row
from ln_ray.io.shards import blocks, iter_parquet
from ln_ray.schema import (
    RAW_SCHEMA,
)
from tests.helpers import GOOD_ROW, parquet_with_a_corrupt_row_group, raw_table


def test_jsonl_lines_are_parsed_one_by_one():
    lines = b"\n".join(
        [
            json.dumps(GOOD_ROW).encode(),
            b"{broken",
            b"",
            b"\xff\xfe not utf-8",
            b"[1, 2]",
            json.dumps({**GOOD_ROW, "teacher": 5}).encode(),
            json.dumps({**GOOD_ROW, "extra_col": [1, 2]}).encode() + b"\r",
        ]
    )
    table = raw_table(lines)
    assert table.schema == RAW_SCHEMA
    rows = table.to_pylist()
    assert [r["row_number"] for r in rows] == [1, 2, 4, 5, 6, 7]
    assert rows[0]["read_error"] is None and rows[0]["prompt_id"] == "1"
    assert rows[1]["read_error"].startswith("invalid JSON")
    assert rows[2]["read_error"] == "line is not valid UTF-8"
    assert rows[3]["read_error"] == "line is not a JSON object"
    assert rows[4]["read_error"] == "teacher is not a string"
    assert json.loads(rows[5]["extra"]) == {"extra_col": [1, 2]}
    assert all(r["source_file"] == "mem://shard.jsonl" for r in rows)


def test_column_names_are_mapped():
    columns = ColumnsConfig(prompt="question", response="answer", teacher="model")
    table = raw_table(
        json.dumps({"question": "Q?", "answer": "A.", "model": "m"}).encode(), columns
    )
    row = table.to_pylist()[0]
    assert (row["prompt"], row["response"], row["teacher"]) == ("Q?", "A.", "m")


def test_parquet_rows_and_a_corrupt_shard():
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([GOOD_ROW, {**GOOD_ROW, "teacher": "u"}]), buffer)
    rows = list(iter_parquet(io.BytesIO(buffer.getvalue()), ColumnsConfig()))
    assert [r["row_number"] for r in rows] == [1, 2]
    broken = list(iter_parquet(io.BytesIO(b"PAR1 this is not parquet"), ColumnsConfig()))
    assert len(broken) == 1 and broken[0]["read_error"].startswith("cannot read Parquet shard")


def test_odd_jsonl_lines_are_rejected_alone():
    lines = b"\n".join(
        [
            b"\xef\xbb\xbf" + json.dumps(GOOD_ROW).encode(),  # a byte order mark opens the file
            json.dumps({**GOOD_ROW, "response": "ok \ud800 done."}, ensure_ascii=True).encode(),
            json.dumps({**GOOD_ROW, "note": {"\udc00": 1}}, ensure_ascii=True).encode(),
            json.dumps({**GOOD_ROW, "teacher": "\ud800", "steps": ["\ud800"]}).encode(),
            b'{"deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            b'{"n": ' + b"1" * 5000 + b"}",
            json.dumps(GOOD_ROW).encode(),
        ]
    )
    rows = raw_table(lines).to_pylist()  # every row stores in Arrow: the block builds
    assert [r["row_number"] for r in rows] == list(range(1, 8))
    assert rows[0]["read_error"] is None and rows[0]["teacher"] == "t"
    assert rows[1]["read_error"] == "response is not valid Unicode" and rows[1]["response"] is None
    assert rows[2]["read_error"] == "a column is not valid Unicode" and rows[2]["extra"] is None
    assert rows[3]["read_error"] == "teacher is not valid Unicode; steps is not valid Unicode"
    assert rows[4]["read_error"] == "invalid JSON: nested too deeply"
    assert rows[5]["read_error"].startswith("invalid JSON: Exceeds the limit")
    assert rows[6]["read_error"] is None


def test_a_row_arrow_cannot_store_fails_alone():
    rows = [{"row_number": n, "read_error": None, "prompt": "Q?"} for n in (1, 2, 3)]
    rows[1]["prompt"] = "\ud800"  # as if it had slipped past canonical_row
    table = pa.concat_tables(list(blocks(iter(rows), "mem://shard.jsonl")))
    assert table["prompt"].to_pylist() == ["Q?", None, "Q?"]
    assert table["read_error"][1].as_py().startswith("row cannot be stored: UnicodeEncodeError")
    assert table["source_file"].to_pylist() == ["mem://shard.jsonl"] * 3


def test_numeric_prompt_ids_read_the_same_from_jsonl_and_parquet():
    ids = [1, 1.0, float("nan"), float("inf"), 1.5, True, "q1"]
    table = raw_table(b"\n".join(json.dumps({**GOOD_ROW, "prompt_id": i}).encode() for i in ids))
    rows = table.to_pylist()
    assert [r["prompt_id"] for r in rows] == ["1", "1", None, None, "1.5", None, "q1"]
    assert [r["read_error"] for r in rows] == [
        None, None, None, None, "prompt_id is a number with a fraction",
        "prompt_id is not a string or number", None,
    ]  # fmt: skip
    buffer = io.BytesIO()
    column = pa.array([1.0, float("nan"), None, 2.5], pa.float64())
    pq.write_table(pa.table({"prompt_id": column, "prompt": ["Q?"] * 4}), buffer)
    rows = list(iter_parquet(io.BytesIO(buffer.getvalue()), ColumnsConfig()))
    assert [r["prompt_id"] for r in rows] == ["1", None, None, "2.5"]
    assert [r["read_error"] is None for r in rows] == [True, True, True, False]


def test_a_corrupt_parquet_row_group_costs_only_its_rows():
    rows = [
        {**GOOD_ROW, "prompt_id": f"q{i}", "response": f"So the answer is {i}."} for i in range(6)
    ]
    shard = io.BytesIO(parquet_with_a_corrupt_row_group(rows))
    rows = list(iter_parquet(shard, ColumnsConfig()))
    assert [r["row_number"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["prompt_id"] for r in rows[:3]] == ["q0", "q1", "q2"]
    assert all(r["read_error"] is None for r in rows[:3])
    lost = "cannot read Parquet row group: group 2 of 2 (rows 4-6)"
    assert all(r["read_error"].startswith(lost) for r in rows[3:])


def test_row_counts_match_the_reader_whatever_the_chunks(monkeypatch):
    """The accounting's independent count (NumPy over chunks) agrees with the lines that
    iter_jsonl numbers: blank and whitespace-only lines, CRLF, a byte order mark, no final
    newline, and lines cut across chunk edges."""
    import codecs
    import random

    from ln_ray.io import shards
    from ln_ray.io.pieces import Piece, numbered_lines

    rng = random.Random(0)
    for _ in range(300):
        blank = rng.choice([0, 0.02, 0.2])
        parts = [
            rng.choice([b"", b"  ", b"\t", b"\r", b" \r", b"\x0b", b" \x0c"])
            if rng.random() < blank
            else b'{"a": "' + bytes(rng.choices(b"xyz \t", k=rng.randrange(3000))) + b'"}\r'
            for _ in range(rng.randrange(30))
        ]
        data = (codecs.BOM_UTF8 if rng.random() < 0.3 else b"") + b"\n".join(parts)
        data += rng.choice([b"", b"\n", b"\n\n"])
        whole = Piece("f", "jsonl", len(data))
        expected = sum(1 for _, line in numbered_lines(io.BytesIO(data), whole) if line.strip())
        for chunk in (1, 2, 7, 64, 1 << 20):
            monkeypatch.setattr(shards, "_READ_CHUNK", chunk)
            assert shards.count_lines(io.BytesIO(data)) == expected


def test_reader_maps_the_reasoning_column():
    columns = ColumnsConfig(reasoning="reasoning_content")
    record = {"prompt": "Q", "teacher": "t", "response": "A", "reasoning_content": "R", "x": 1}
    row = canonical_row(record, columns, 1)
    assert row["reasoning"] == "R" and json.loads(row["extra"]) == {"x": 1}
    bad = canonical_row({**record, "reasoning_content": ["R"]}, columns, 2)
    assert bad["read_error"] == "reasoning is not a string" and bad["reasoning"] is None
