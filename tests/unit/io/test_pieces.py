"""Files read in pieces give exactly the lines, numbers and rows of the file read whole."""

from __future__ import annotations

import codecs
import io
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ln_ray.config import ColumnsConfig
from ln_ray.io.pieces import (
    Piece,
    byte_ranges,
    count_newlines,
    jsonl_pieces,
    numbered_lines,
    parquet_pieces,
)
from ln_ray.io.shards import iter_jsonl, iter_parquet


def _expected(data: bytes) -> list[tuple[int, bytes]]:
    """Every line of ``data`` with its 1-based number (the last one only if it has bytes)."""
    parts = data.removeprefix(codecs.BOM_UTF8).split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    return [(n, part.rstrip(b"\r")) for n, part in enumerate(parts, 1)]


def _random_file(rng: random.Random) -> bytes:
    lines = []
    for _ in range(rng.randrange(0, 40)):
        kind = rng.random()
        if kind < 0.15:
            lines.append(b"")  # blank
        elif kind < 0.25:
            lines.append(b"x" * rng.randrange(50, 400))  # longer than some pieces
        else:
            lines.append(bytes(rng.choice(b"ab \r{}") for _ in range(rng.randrange(1, 12))))
    data = b"\n".join(lines)
    if rng.random() < 0.5:
        data += b"\n"
    if rng.random() < 0.2:
        data = codecs.BOM_UTF8 + data
    if rng.random() < 0.2:
        data = data.replace(b"\n", b"\r\n")
    return data


def _read_in_pieces(data: bytes, split_bytes: int) -> list[tuple[int, bytes]]:
    ranges = byte_ranges(len(data), split_bytes)
    newlines = [count_newlines(io.BytesIO(data), a, b) for a, b in ranges]
    pieces = jsonl_pieces("f.jsonl", ranges, newlines)
    assert len(pieces) == len(ranges) and pieces[0].start == 0 and pieces[-1].stop is None
    return [line for piece in pieces for line in numbered_lines(io.BytesIO(data), piece)]


def test_jsonl_pieces_give_every_line_once_with_its_number():
    rng = random.Random(7)
    for _ in range(400):
        data = _random_file(rng)
        expected = _expected(data)
        for split_bytes in (1, 2, 3, 7, 50, 10_000):
            assert _read_in_pieces(data, split_bytes) == expected, (data, split_bytes)


def test_a_split_jsonl_file_gives_the_rows_of_the_whole_file():
    rows = [b'{"prompt": "q%d", "response": "r", "teacher": "t"}' % n for n in range(60)]
    rows[7], rows[20], rows[33] = b"", b"not json", b'"a string"'
    data = b"\n".join(rows) + b"\n"
    columns = ColumnsConfig()
    whole = list(iter_jsonl(io.BytesIO(data), columns))
    ranges = byte_ranges(len(data), 97)
    pieces = jsonl_pieces("f", ranges, [count_newlines(io.BytesIO(data), *r) for r in ranges])
    split = [row for p in pieces for row in iter_jsonl(io.BytesIO(data), columns, p)]
    assert split == whole and len(pieces) > 20
    assert [r["row_number"] for r in split if r.get("read_error")] == [21, 34]


@pytest.mark.parametrize(("split_bytes", "count"), [(1, 8), (3000, 3), (10**9, 1)])
def test_a_split_parquet_file_gives_the_rows_of_the_whole_file(split_bytes, count):
    """Eight row groups of 7 rows (the last of 1), cut into pieces of whole groups."""
    table = pa.table(
        {
            "prompt": [f"q{n}" for n in range(50)],
            "response": [f"r{n}" * 30 for n in range(50)],
            "teacher": ["t"] * 50,
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=7)
    data = sink.getvalue()
    metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    pieces = parquet_pieces("f.parquet", metadata, split_bytes)
    columns = ColumnsConfig()
    whole = list(iter_parquet(io.BytesIO(data), columns))
    split = [row for p in pieces for row in iter_parquet(io.BytesIO(data), columns, p)]
    assert split == whole and [r["row_number"] for r in split] == list(range(1, 51))
    assert len(pieces) == count
    assert sum(p.size for p in pieces) == sum(
        metadata.row_group(g).total_byte_size for g in range(metadata.num_row_groups)
    )


def test_a_whole_file_is_one_piece():
    assert byte_ranges(0, 10) == [(0, 0)] and byte_ranges(25, 10) == [(0, 8), (8, 16), (16, 25)]
    piece = jsonl_pieces("f", [(0, 5)], [1])[0]
    assert piece == Piece("f", "jsonl", 5) and piece.whole
