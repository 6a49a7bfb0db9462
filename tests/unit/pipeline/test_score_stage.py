"""The scoring stage (ln_ray/pipeline/score_stage.py), in-process (no cluster): it proves its
student before its first batch, retries, splits, restarts or stops as each failure needs, and
rejects only what cannot be scored, with the reason and kind."""

from __future__ import annotations

import json

import pytest
import torch

from ln_ray.config import ComputeConfig, ScoringConfig, StudentConfig
from ln_ray.io.cache import ScoreCache
from ln_ray.io.folder import Folder
from ln_ray.pipeline.score_stage import ScoreStage
from tests.helpers import GOOD_ROW, prepared_rows, raw_table


def test_a_trace_that_keeps_failing_is_rejected_and_the_rest_scored(
    tiny_student_dir, tmp_path, monkeypatch
):
    rows = [{**GOOD_ROW, "prompt_id": f"q{i}", "response": f"Step {i}. Done."} for i in range(5)]
    raw = raw_table(b"\n".join(json.dumps(r).encode() for r in rows))
    student = StudentConfig(model=tiny_student_dir)
    _, prepared = prepared_rows(student, raw)
    stage = ScoreStage(
        student,
        ScoringConfig(window=1),
        ComputeConfig(max_retries=1),
        ScoreCache(str(tmp_path / "cache")),
        Folder(str(tmp_path / "run")),
    )
    poison = prepared["input_ids"][2].as_py()
    real_score, calls = stage.scorer.score, []

    def score(traces):
        calls.append(len(traces))
        if any(t.input_ids.tolist() == poison for t in traces):
            raise RuntimeError("kernel\nfailure")
        return real_score(traces)

    monkeypatch.setattr(stage.scorer, "score", score)
    assert stage(prepared).to_pylist() == [{"traces": 4, "rejected": 1}]
    (rejected,) = _late(tmp_path)
    assert rejected == {
        "prompt_id": "q2",
        "trace_id": prepared["trace_id"][2].as_py(),
        "reason": "scoring failed: RuntimeError: kernel failure",
        "kind": "scoring_error",
    }
    # the batch twice (max_retries=1), then halves, each once, down to the one trace
    assert calls == [5, 5, 2, 3, 1, 2]
    stored = ScoreCache(str(tmp_path / "cache")).read_table("").to_pylist()
    poisoned = prepared["trace_id"][2].as_py()
    assert len(stored) == 4 and poisoned not in {r["trace_id"] for r in stored}


def test_a_prompt_that_fills_the_global_cap_is_rejected(tiny_student_dir, tmp_path):
    student = StudentConfig(model=tiny_student_dir)
    _, prepared = prepared_rows(student, raw_table(json.dumps(GOOD_ROW).encode()))
    cap = prepared["prefix_len"][0].as_py()
    stage = ScoreStage(
        student,
        ScoringConfig(max_tokens=cap),
        ComputeConfig(),
        ScoreCache(str(tmp_path / "cache")),
        Folder(str(tmp_path / "run")),
    )
    stage(prepared)
    (row,) = _late(tmp_path)
    assert row["reason"] == f"prompt longer than scoring.max_tokens ({cap} tokens)"
    assert not ScoreCache(str(tmp_path / "cache")).files()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_actor_without_a_gpu_refuses_to_score(tiny_student_dir, tmp_path):
    student = StudentConfig(model=tiny_student_dir)
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        ScoreStage(
            student,
            ScoringConfig(),
            ComputeConfig(gpus_per_actor=1),
            ScoreCache(str(tmp_path / "cache")),
            Folder(str(tmp_path / "run")),
        )


def _late(tmp_path) -> list[dict]:
    """The traces a stage wrote to its run's ``_late/``."""
    from ln_ray.schema import SCORING_REJECTS_SCHEMA

    run = Folder(str(tmp_path / "run"))
    assert all(name.startswith("_late/part-") for name in run.parquet_files("_late"))
    return run.read_table("_late", schema=SCORING_REJECTS_SCHEMA).to_pylist()


class Reports:
    """What a scoring actor tells the job (``progress``), recorded."""

    def __init__(self) -> None:
        self.halted: list[str] = []
        self.proofs: list[dict] = []

    def halt(self, reason: str) -> None:
        self.halted.append(reason)

    def proof(self, record: dict) -> None:
        self.proofs.append(record)

    def kernel(self, name: str) -> None:
        pass

    def add(self, traces: int, tokens: int) -> None:
        pass

    def packs(self, tokens: int) -> None:
        pass


def test_an_actor_proves_its_student_before_its_first_batch(tiny_student_dir, tmp_path):
    from ln_ray.score.student import check_student

    student = StudentConfig(model=tiny_student_dir)
    reports = Reports()
    identity = check_student(student).identity
    ScoreStage(
        student,
        ScoringConfig(),
        ComputeConfig(),
        ScoreCache(str(tmp_path / "cache")),
        Folder(str(tmp_path / "run")),
        identity,
        reports,
    )
    (proof,) = reports.proofs
    assert proof["covered_by_tests"] and proof["max_difference"] < proof["tolerance"]
    assert reports.halted == []


def test_an_actor_whose_student_differs_from_the_drivers_stops_the_job(tiny_student_dir, tmp_path):
    from ln_ray.score.vetting import StudentError

    reports = Reports()
    with pytest.raises(StudentError, match="not the one the job checked"):
        ScoreStage(
            StudentConfig(model=tiny_student_dir),
            ScoringConfig(),
            ComputeConfig(),
            ScoreCache(str(tmp_path / "cache")),
            Folder(str(tmp_path / "run")),
            identity="another-snapshot@0123456789abcdef",
            progress=reports,
        )
    (reason,) = reports.halted
    assert "another-snapshot@0123456789abcdef on the driver" in reason


def test_an_actor_whose_student_fails_its_self_check_stops_the_job(leaky_student_dir, tmp_path):
    from ln_ray.score.proof import ProofError

    reports = Reports()
    student = StudentConfig(model=leaky_student_dir, trust_remote_code=True)
    with pytest.raises(ProofError):
        ScoreStage(
            student,
            ScoringConfig(),
            ComputeConfig(),
            ScoreCache(str(tmp_path / "cache")),
            Folder(str(tmp_path / "run")),
            progress=reports,
        )
    (reason,) = reports.halted
    assert reason.startswith(f"student {leaky_student_dir!r} failed its self-check: the ")
    assert not ScoreCache(str(tmp_path / "cache")).files()  # nothing scored


def _five_traces(tiny_student_dir):
    rows = [{**GOOD_ROW, "prompt_id": f"q{i}", "response": f"Step {i}. Done."} for i in range(5)]
    raw = raw_table(b"\n".join(json.dumps(r).encode() for r in rows))
    student = StudentConfig(model=tiny_student_dir)
    _, prepared = prepared_rows(student, raw)
    return student, prepared


def test_a_trace_out_of_memory_alone_is_tried_in_smaller_packs_then_rejected(
    tiny_student_dir, tmp_path, monkeypatch
):
    student, prepared = _five_traces(tiny_student_dir)
    stage = ScoreStage(
        student,
        ScoringConfig(window=1),
        ComputeConfig(token_budget=256),
        ScoreCache(str(tmp_path / "cache")),
        Folder(str(tmp_path / "run")),
    )
    long_trace = prepared["input_ids"][4].as_py()
    real_forward, real_plan = stage.scorer._forward_pack, stage.scorer.plan
    budgets, long_sequences = [], set()

    def plan(traces):
        planned = real_plan(traces)
        for seq in planned.global_sequences + planned.window_sequences:
            if traces[seq.trace].input_ids.tolist() == long_trace:
                long_sequences.add(id(seq))
        return planned

    def forward_by_trace(pack, prefix_lens, store):
        # The device holds packs of 20 tokens at the configured budget, any pack at 64 tokens
        # or less; one trace never fits.
        budgets.append(stage.scorer.token_budget)
        if any(id(s) in long_sequences for s in pack) or (
            stage.scorer.token_budget > 64 and sum(len(s.tokens) for s in pack) > 20
        ):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real_forward(pack, prefix_lens, store)

    monkeypatch.setattr(stage.scorer, "plan", plan)
    monkeypatch.setattr(stage.scorer, "_forward_pack", forward_by_trace)
    stage(prepared)
    (rejected,) = _late(tmp_path)
    assert rejected["trace_id"] == prepared["trace_id"][4].as_py()
    assert rejected == {
        **rejected,
        "reason": "too long for this device at compute.token_budget=256",
        "kind": "out_of_memory",
    }
    assert {128, 64} <= set(budgets)  # alone, in smaller packs, before giving up
    assert stage.scorer.token_budget == 256  # and back to the configured budget
    stored = ScoreCache(str(tmp_path / "cache")).read_table("").to_pylist()
    assert len(stored) == 4  # the four others were scored, in packs of 64 tokens


def test_a_device_error_that_poisons_the_actor_restarts_it(tiny_student_dir, tmp_path, monkeypatch):
    from ln_ray.pipeline import score_stage

    student, prepared = _five_traces(tiny_student_dir)
    stage = ScoreStage(
        student,
        ScoringConfig(window=1),
        ComputeConfig(),
        ScoreCache(str(tmp_path / "cache")),
        Folder(str(tmp_path / "run")),
    )

    def poisoned(traces):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    class Exited(BaseException):
        pass

    def exit_actor(status):
        raise Exited(status)

    monkeypatch.setattr(stage.scorer, "score", poisoned)
    monkeypatch.setattr(score_stage, "_exit_actor", exit_actor)
    with pytest.raises(Exited) as exited:
        stage(prepared)  # never a reject: the process ends, and Ray restarts it
    assert exited.value.args == (score_stage.DEVICE_ERROR_EXIT,)
    assert not ScoreCache(str(tmp_path / "cache")).files()
