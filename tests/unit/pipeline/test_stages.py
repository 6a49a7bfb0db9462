"""The per-row stages (ln_ray/pipeline/stages.py), in-process on Arrow tables (no cluster)."""

from __future__ import annotations

import json

from ln_ray.config import ComputeConfig, ScoringConfig, StudentConfig
from ln_ray.io.cache import ScoreCache
from ln_ray.io.folder import Folder
from ln_ray.pipeline.score_stage import ScoreStage
from ln_ray.schema import (
    CACHE_SCHEMA,
    PREPARED_SCHEMA,
    VALIDATED_SCHEMA,
)
from tests.helpers import GOOD_ROW, prepared_rows, raw_table


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
    validated, prepared = prepared_rows(student, raw)
    assert validated.schema == VALIDATED_SCHEMA and prepared.schema == PREPARED_SCHEMA
    reasons = validated["reject_reason"].to_pylist()
    assert (
        reasons[0] is None
        and reasons[1].startswith("invalid JSON")
        and reasons[2] == "empty response"
    )
    assert prepared.num_rows == 1 and prepared["step_chars"].to_pylist() == [[24, 17]]

    cache_dir = ScoreCache(str(tmp_path / "cache"))
    run = Folder(str(tmp_path / "run"))
    stage = ScoreStage(
        student, ScoringConfig(window=1), ComputeConfig(token_budget=64), cache_dir, run
    )
    out = stage(prepared)
    assert out.to_pylist() == [{"traces": 1, "rejected": 0}]
    assert not run.parquet_files("_late")  # scored: nothing rejected
    files = cache_dir.files()
    assert len(files) == 1
    stored = cache_dir.read_table(files[0])
    assert stored.schema == CACHE_SCHEMA
    row = stored.to_pylist()[0]
    assert row["trace_id"] == prepared["trace_id"][0].as_py() == validated["trace_id"][0].as_py()
    assert row["lalp"] < 0 and row["n_steps"] == 2 and row["model_tokens"] > 0
    assert row["step_chars"] == [24, 17]
