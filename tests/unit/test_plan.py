"""`ln-ray plan` (ln_ray/plan.py): its estimates against the scorer's own accounting and plain
arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ln_ray.cli import main
from ln_ray.config import load_config
from ln_ray.plan import plan_run, student_parameters
from ln_ray.prepare.render import unconditional_context
from ln_ray.prepare.rows import prepare_row
from ln_ray.score.scorer import StudentScorer
from ln_ray.score.student import load_student

SENTENCES = ["First, add the numbers. ", "Then check the sum. ", "So the answer is 10. "]


def _write(folder, start: int, n: int) -> list[dict]:
    rows = [
        {
            "prompt_id": f"q{i}",
            "prompt": f"Puzzle {i}: what is the total?",
            "teacher": "t",
            "response": "".join(SENTENCES[: 1 + i % 3]) * (1 + i % 4),
        }
        for i in range(start, start + n)
    ]
    rows.append({"prompt": "Q", "teacher": "t", "response": ""})  # rejected
    folder.mkdir(exist_ok=True)
    (folder / f"part-{start}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_plan_matches_the_scorer_and_its_arithmetic(tiny_student_dir, tmp_path):
    rows = _write(tmp_path / "in", 0, 12) + _write(tmp_path / "in", 100, 9)
    overrides = [f"input.path={tmp_path / 'in'}", f"student.model={tiny_student_dir}"]
    cfg = load_config("default", overrides)
    plan = plan_run(cfg, sample_rows=1000, gpus=4, gpu_tflops=100.0, mfu=0.5)
    assert plan["rows"] == len(rows)  # every file sampled: the count is exact
    assert plan["sample"] == {"files": 2, "rows": len(rows), "rejected": 2}
    assert plan["traces_to_score"] == len(rows) - 2
    # per trace model tokens: what the scorer itself plans for the same traces
    student = load_student(cfg.student)
    traces = [prepare_row(r, student.tokenizer).tokens for r in rows if r["response"]]
    unconditional = unconditional_context(student.tokenizer)  # scoring.ifd, on by default
    planned = StudentScorer(
        student.model, window=cfg.scoring.window, unconditional=unconditional
    ).plan(traces)
    assert plan["per_trace"]["model_tokens"] == pytest.approx(np.mean(planned.model_tokens))
    ifd_tokens = [len(unconditional) + t.n_response for t in traces]
    assert plan["per_trace"]["ifd_tokens"] == pytest.approx(np.mean(ifd_tokens))
    n_response = np.mean([t.n_response for t in traces])
    assert plan["per_trace"]["response_tokens"] == pytest.approx(n_response)
    # the student's size, counted on the loaded model
    embeddings = student.model.get_input_embeddings().weight
    head = student.model.get_output_embeddings().weight
    body = sum(p.numel() for p in student.model.parameters()) - embeddings.numel()
    body -= head.numel() if head is not embeddings else 0
    assert student_parameters(cfg) == (body, head.numel())
    # the head runs on the targets of every sequence: each response token globally, locally
    # (unless its window is a prefix of the global sequence) and given no prompt
    sequences = planned.global_sequences + planned.window_sequences
    positions = sum(len(s.targets) for s in sequences + planned.unconditional_sequences)
    assert 2 * n_response * len(traces) <= positions <= 3 * n_response * len(traces)
    flops = len(traces) * 2 * body * np.mean(planned.model_tokens) + 2 * head.numel() * positions
    assert plan["flops"] == pytest.approx(flops)
    assert plan["gpu_hours"] == pytest.approx(flops / (100e12 * 0.5) / 3600)
    assert plan["wall_hours"] == pytest.approx(plan["gpu_hours"] / 4)
    # the RayJob's deadline holds the estimate with its margin and a start per attempt
    deadline = plan["rayjob"]["active_deadline_s"]
    assert deadline % 3600 == 0 and plan["rayjob"]["backoff_limit"] == 1
    assert 0 <= deadline - 3600 * (1.5 * plan["wall_hours"] + 2) < 3600
    # a refresh where 5% of the traces are new costs 5% of the compute
    refresh = plan_run(cfg, sample_rows=1000, new_fraction=0.05, gpu_tflops=100.0, mfu=0.5)
    assert refresh["flops"] == pytest.approx(0.05 * plan["flops"])
    # without IFD, each trace's response tokens and the no-prompt context cost nothing more
    off = load_config("default", [*overrides, "scoring.ifd=false"])
    without = plan_run(off, sample_rows=1000, gpus=4, gpu_tflops=100.0, mfu=0.5)
    saved = plan["per_trace"]["model_tokens"] - without["per_trace"]["model_tokens"]
    assert saved == pytest.approx(np.mean(ifd_tokens)) and without["per_trace"]["ifd_tokens"] == 0


def test_plan_command_prints_the_estimate(tiny_student_dir, tmp_path, capsys):
    _write(tmp_path / "in", 0, 5)
    assert main(["plan", str(tmp_path / "in"), f"student.model={tiny_student_dir}"]) == 0
    printed = capsys.readouterr().out
    assert "GPU-hours" in printed and "model tokens" in printed and "rows (estimated): 6" in printed
    assert "RayJob (infra/k8s/rayjob.yaml) for 8 GPUs: activeDeadlineSeconds: 10800" in printed
    assert main(["plan", str(tmp_path / "missing"), f"student.model={tiny_student_dir}"]) == 2
