"""Reading shards and the per-row stages, in-process on Arrow tables (no cluster)."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.parquet as pq_
import pytest
import torch
from helpers import parquet_with_a_corrupt_row_group

from ln_ray.config import ColumnsConfig, ComputeConfig, ScoringConfig, SegmentConfig, StudentConfig
from ln_ray.io import cache
from ln_ray.io.shards import _blocks, iter_jsonl, iter_parquet
from ln_ray.pipeline.stages import ScoreStage, is_new, tokenize_batch, validate_batch
from ln_ray.schema import (
    CACHE_SCHEMA,
    LATE_REJECTS_SCHEMA,
    PREPARED_SCHEMA,
    RAW_SCHEMA,
    VALIDATED_SCHEMA,
)

GOOD = {
    "prompt_id": 1,
    "prompt": "Q?",
    "teacher": "t",
    "response": "First, add the numbers. Then we are done.",
}


def _raw(lines: bytes, columns: ColumnsConfig | None = None) -> pa.Table:
    rows = iter_jsonl(io.BytesIO(lines), columns or ColumnsConfig())
    return pa.concat_tables(list(_blocks(rows, "mem://shard.jsonl")))


def test_jsonl_lines_are_parsed_one_by_one():
    lines = b"\n".join(
        [
            json.dumps(GOOD).encode(),
            b"{broken",
            b"",
            b"\xff\xfe not utf-8",
            b"[1, 2]",
            json.dumps({**GOOD, "teacher": 5}).encode(),
            json.dumps({**GOOD, "extra_col": [1, 2]}).encode() + b"\r",
        ]
    )
    table = _raw(lines)
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
    table = _raw(json.dumps({"question": "Q?", "answer": "A.", "model": "m"}).encode(), columns)
    row = table.to_pylist()[0]
    assert (row["prompt"], row["response"], row["teacher"]) == ("Q?", "A.", "m")


def test_parquet_rows_and_a_corrupt_shard():
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "teacher": "u"}]), buffer)
    rows = list(iter_parquet(io.BytesIO(buffer.getvalue()), ColumnsConfig()))
    assert [r["row_number"] for r in rows] == [1, 2]
    broken = list(iter_parquet(io.BytesIO(b"PAR1 this is not parquet"), ColumnsConfig()))
    assert len(broken) == 1 and broken[0]["read_error"].startswith("cannot read Parquet shard")


def test_odd_jsonl_lines_are_rejected_alone():
    lines = b"\n".join(
        [
            b"\xef\xbb\xbf" + json.dumps(GOOD).encode(),  # a byte order mark opens the file
            json.dumps({**GOOD, "response": "ok \ud800 done."}, ensure_ascii=True).encode(),
            json.dumps({**GOOD, "note": {"\udc00": 1}}, ensure_ascii=True).encode(),
            json.dumps({**GOOD, "teacher": "\ud800", "steps": ["\ud800"]}).encode(),
            b'{"deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            b'{"n": ' + b"1" * 5000 + b"}",
            json.dumps(GOOD).encode(),
        ]
    )
    rows = _raw(lines).to_pylist()  # every row stores in Arrow: the block builds
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
    table = pa.concat_tables(list(_blocks(iter(rows), "mem://shard.jsonl")))
    assert table["prompt"].to_pylist() == ["Q?", None, "Q?"]
    assert table["read_error"][1].as_py().startswith("row cannot be stored: UnicodeEncodeError")
    assert table["source_file"].to_pylist() == ["mem://shard.jsonl"] * 3


def test_numeric_prompt_ids_read_the_same_from_jsonl_and_parquet():
    ids = [1, 1.0, float("nan"), float("inf"), 1.5, True, "q1"]
    table = _raw(b"\n".join(json.dumps({**GOOD, "prompt_id": i}).encode() for i in ids))
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
    rows = [{**GOOD, "prompt_id": f"q{i}", "response": f"So the answer is {i}."} for i in range(6)]
    shard = io.BytesIO(parquet_with_a_corrupt_row_group(rows))
    rows = list(iter_parquet(shard, ColumnsConfig()))
    assert [r["row_number"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["prompt_id"] for r in rows[:3]] == ["q0", "q1", "q2"]
    assert all(r["read_error"] is None for r in rows[:3])
    lost = "cannot read Parquet row group: group 2 of 2 (rows 4-6)"
    assert all(r["read_error"].startswith(lost) for r in rows[3:])


def _prepared(student, raw, cached=()):
    """Validate and tokenize raw rows as the job does: (validated, prepared new rows)."""
    settings = {"segment": SegmentConfig(), "scoring": ScoringConfig(max_response_chars=1000)}
    ids = np.unique(np.asarray(list(cached), dtype="S32"))
    validated = validate_batch(raw, student=student, cached=ids, **settings)
    new = validated.filter(is_new(validated))
    return validated, tokenize_batch(new, student=student, **settings)


def test_validate_tokenize_and_score_stages(tiny_student_dir, tmp_path):
    raw = _raw(
        b"\n".join(
            [json.dumps(GOOD).encode(), b"{broken", json.dumps({**GOOD, "response": " "}).encode()]
        )
    )
    student = StudentConfig(model=tiny_student_dir)
    validated, prepared = _prepared(student, raw)
    assert validated.schema == VALIDATED_SCHEMA and prepared.schema == PREPARED_SCHEMA
    reasons = validated["reject_reason"].to_pylist()
    assert (
        reasons[0] is None
        and reasons[1].startswith("invalid JSON")
        and reasons[2] == "empty response"
    )
    assert validated["cached"].to_pylist() == [False, False, False]
    assert prepared.num_rows == 1 and prepared["step_chars"].to_pylist() == [[24, 17]]

    cache_dir = str(tmp_path / "cache")
    stage = ScoreStage(student, ScoringConfig(window=1), ComputeConfig(token_budget=64), cache_dir)
    out = stage(prepared)
    assert out.schema == LATE_REJECTS_SCHEMA and out.num_rows == 0  # scored: nothing rejected
    files = cache.cache_files(cache_dir)
    assert len(files) == 1
    stored = pq_.read_table(files[0])
    assert stored.schema == CACHE_SCHEMA
    row = stored.to_pylist()[0]
    assert row["trace_id"] == prepared["trace_id"][0].as_py() == validated["trace_id"][0].as_py()
    assert row["lalp"] < 0 and row["n_steps"] == 2 and row["model_tokens"] > 0
    assert row["step_chars"] == [24, 17]

    # a trace already in the cache is found at validation: it is never tokenized again
    validated, prepared = _prepared(student, raw, cached=[row["trace_id"]])
    assert validated["cached"].to_pylist() == [True, False, False]
    assert prepared.num_rows == 0


def test_a_trace_that_keeps_failing_is_rejected_and_the_rest_scored(
    tiny_student_dir, tmp_path, monkeypatch
):
    rows = [{**GOOD, "prompt_id": f"q{i}", "response": f"Step {i}. Done."} for i in range(5)]
    raw = _raw(b"\n".join(json.dumps(r).encode() for r in rows))
    student = StudentConfig(model=tiny_student_dir)
    _, prepared = _prepared(student, raw)
    stage = ScoreStage(
        student, ScoringConfig(window=1), ComputeConfig(max_retries=1), str(tmp_path)
    )
    poison = prepared["input_ids"][2].as_py()
    real_score, calls = stage.scorer.score, []

    def score(traces):
        calls.append(len(traces))
        if any(t.input_ids.tolist() == poison for t in traces):
            raise RuntimeError("kernel\nfailure")
        return real_score(traces)

    monkeypatch.setattr(stage.scorer, "score", score)
    (rejected,) = stage(prepared).to_pylist()
    assert rejected == {
        "source_file": prepared["source_file"][2].as_py(),
        "row_number": prepared["row_number"][2].as_py(),
        "reason": "scoring failed: RuntimeError: kernel failure",
    }
    # the batch twice (max_retries=1), then halves, each once, down to the one trace
    assert calls == [5, 5, 2, 3, 1, 2]
    stored = pq_.read_table(cache.cache_files(str(tmp_path))).to_pylist()
    poisoned = prepared["trace_id"][2].as_py()
    assert len(stored) == 4 and poisoned not in {r["trace_id"] for r in stored}


def test_a_prompt_that_fills_the_global_cap_is_rejected(tiny_student_dir, tmp_path):
    student = StudentConfig(model=tiny_student_dir)
    _, prepared = _prepared(student, _raw(json.dumps(GOOD).encode()))
    cap = prepared["prefix_len"][0].as_py()
    stage = ScoreStage(student, ScoringConfig(max_tokens=cap), ComputeConfig(), str(tmp_path))
    (row,) = stage(prepared).to_pylist()
    assert row["reason"] == f"prompt longer than scoring.max_tokens ({cap} tokens)"
    assert not cache.cache_files(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_actor_without_a_gpu_refuses_to_score(tiny_student_dir, tmp_path):
    student = StudentConfig(model=tiny_student_dir)
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        ScoreStage(student, ScoringConfig(), ComputeConfig(gpus_per_actor=1), str(tmp_path))


def test_cache_membership():
    ids = np.unique(np.asarray(["b" * 32, "a" * 32, "c" * 32], dtype="S32"))
    assert cache.contains(ids, ["a" * 32, "d" * 32, "c" * 32]).tolist() == [True, False, True]
    assert cache.contains(np.array([], dtype="S32"), ["a" * 32]).tolist() == [False]


def _cache_rows(ids: list[str], lalp: float) -> pa.Table:
    return pa.Table.from_pylist(
        [{"trace_id": i, "lalp": lalp, "n_tokens": 3, "step_chars": [1, 2]} for i in ids],
        schema=CACHE_SCHEMA,
    )


def test_every_scoring_setting_but_the_row_filter_is_in_the_cache_key():
    """The key is derived from the scoring config's fields: a new field changes it unless it is
    listed as deciding only which rows are scored."""
    import dataclasses

    base = ScoringConfig()
    key = cache.cache_key("student", base)
    changed = {
        "render": "conversation",
        "reasoning": "student",
        "window": 2,
        "window_fraction": 0.5,
        "rank_clip": 10,
        "max_tokens": 512,
        "max_response_chars": 10,
    }
    assert set(changed) == {f.name for f in dataclasses.fields(ScoringConfig)}
    for name, value in changed.items():
        other = cache.cache_key("student", dataclasses.replace(base, **{name: value}))
        assert (other == key) == (name in cache._NOT_IN_KEY), name
    assert cache.cache_key("another student", base) != key


def test_folding_keeps_one_row_per_trace_in_its_bucket(tmp_path):
    url = str(tmp_path / "cache")
    ids = [hashlib.sha256(str(n).encode()).hexdigest()[:32] for n in range(32)]
    buckets = cache.bucket_of(pa.array(ids), 4).to_pylist()
    assert buckets == [int(i[:12], 16) % 4 for i in ids] and set(buckets) == {0, 1, 2, 3}
    cache.write_part(url, _cache_rows(ids[:20], -1.0))
    cache.write_part(url, _cache_rows(ids[10:], -2.0))  # ten traces again (a retried batch)
    other = cache.write_part(url, _cache_rows(ids[:2], -1.0))  # a bucket of another count
    os.rename(other, os.path.join(url, cache.bucket_name(3, 16)))
    parts = cache.unfolded_files(url, 4)
    assert len(parts) == 3
    for bucket in range(4):
        rows = pa.concat_tables([pq.read_table(p) for p in parts])
        in_bucket = [b == bucket for b in cache.bucket_of(rows["trace_id"], 4).to_pylist()]
        mine = rows.filter(pa.array(in_bucket))
        cache.fold_bucket(url, bucket, 4, mine)
        cache.fold_bucket(url, bucket, 4, mine)  # folding again changes nothing
    for path in parts:
        os.remove(path)
    files = cache.cache_files(url)
    assert sorted(os.path.basename(p) for p in files) == [cache.bucket_name(b, 4) for b in range(4)]
    assert cache.unfolded_files(url, 4) == []
    stored = pa.concat_tables([pq.read_table(p) for p in files])
    assert sorted(stored["trace_id"].to_pylist()) == sorted(ids)  # each trace once
    for path in files:  # every row sits in its own bucket
        bucket = int(os.path.basename(path).split("-")[2].split(".")[0])
        assert set(cache.bucket_of(pq.read_table(path)["trace_id"], 4).to_pylist()) == {bucket}
    assert np.array_equal(cache.cached_trace_ids(url), np.unique(np.asarray(ids, dtype="S32")))


def test_progress_lines_say_how_far_and_how_long():
    from ln_ray.pipeline.progress import progress_line

    line = progress_line(250, 1000, 50_000, 100.0)
    assert line == (
        "scoring: 250 of 1,000 traces (25%), 50,000 tokens, 500 tokens/s, 1m40s elapsed, ETA 5m00s"
    )
    assert progress_line(0, 10, 0, 5.0).endswith("ETA -")
    assert "ETA 2h46m" in progress_line(1, 10_000, 10, 1.0)


def test_row_counts_match_the_reader_whatever_the_chunks(monkeypatch):
    """The accounting's independent count (NumPy over chunks) agrees with the lines that
    iter_jsonl numbers: blank and whitespace-only lines, CRLF, a byte order mark, no final
    newline, and lines cut across chunk edges."""
    import codecs
    import random

    from ln_ray.io import shards

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
        expected = sum(1 for line in shards._lines(io.BytesIO(data)) if line.strip())
        for chunk in (1, 2, 7, 64, 1 << 20):
            monkeypatch.setattr(shards, "_READ_CHUNK", chunk)
            assert shards.count_lines(io.BytesIO(data)) == expected
