"""The per-row stages (ln_ray/pipeline/stages.py), in-process on Arrow tables (no cluster)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq_
import pytest
import torch

from ln_ray.config import ComputeConfig, ScoringConfig, SegmentConfig, StudentConfig
from ln_ray.io import cache
from ln_ray.pipeline.stages import ScoreStage, is_new, tokenize_batch, validate_batch
from ln_ray.schema import (
    CACHE_SCHEMA,
    LATE_REJECTS_SCHEMA,
    PREPARED_SCHEMA,
    VALIDATED_SCHEMA,
)
from tests.helpers import GOOD_ROW, raw_table


def _prepared(student, raw, cached=()):
    """Validate and tokenize raw rows as the job does: (validated, prepared new rows)."""
    settings = {"segment": SegmentConfig(), "scoring": ScoringConfig(max_response_chars=1000)}
    ids = np.unique(np.asarray(list(cached), dtype="S32"))
    validated = validate_batch(raw, student=student, cached=ids, **settings)
    new = validated.filter(is_new(validated))
    return validated, tokenize_batch(new, student=student, **settings)


def test_validate_tokenize_and_score_stages(tiny_student_dir, tmp_path):
    raw = raw_table(
        b"\n".join(
            [
                json.dumps(GOOD_ROW).encode(),
                b"{broken",
                json.dumps({**GOOD_ROW, "response": " "}).encode(),
            ]
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
    rows = [{**GOOD_ROW, "prompt_id": f"q{i}", "response": f"Step {i}. Done."} for i in range(5)]
    raw = raw_table(b"\n".join(json.dumps(r).encode() for r in rows))
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
    _, prepared = _prepared(student, raw_table(json.dumps(GOOD_ROW).encode()))
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
