"""The GPU proof's script, dry-run on a CPU so that it cannot rot between GPU runs: the same
command a GPU machine runs, with the tiny student and short traces."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # a child pytest of tests/equivalence, then the measurements


def test_the_gpu_check_dry_run_tests_and_measures_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels")}
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gpu_check: no problem found" in done.stdout
    results = json.loads(out.read_text())
    tests = results["tests"]
    assert tests["exit_code"] == 0 and tests["passed"] > 0 and not tests["failures"]
    assert tests["skipped"] >= 6  # test_gpu.py's tests skip without CUDA
    assert results["self_check"]["tiny"]["passed"]
    runs = results["throughput"]["tiny"]
    assert set(runs) == {"256", "1024"}
    for figures in runs.values():
        assert figures["model_tokens"] > figures["response_tokens"] > 0
        assert 0 < figures["mfu"] < figures["mfu_with_attention"]
        assert figures["efficiency_vs_dense_forward"] > 0
    assert runs["256"]["speedup_vs_naive"] > 1  # the naive scorer runs on the short traces only
    assert "speedup_vs_naive" not in runs["1024"]
    agreement = results["agreement"]["tiny"]["256"]
    assert 0.3 < agreement["rank_equal"] <= agreement["rank_within_1"] <= 1
    assert agreement["local_logprobs"]["largest"] < 0.5
    assert results["problems"] == []


def test_the_gpu_check_names_what_fails(tmp_path):
    from bench.gpu_check import problems

    results = {
        "tests": {"exit_code": 1, "failures": ["test_gpu::test_x"]},
        "self_check": {"tiny": {"passed": False, "error": "differs by 3.1"}},
        "throughput": {
            "llama-3.1-8b": {"16384": {"mfu": 0.31, "efficiency_vs_dense_forward": 0.9}}
        },
    }
    assert problems(results) == [
        "tests: exit code 1, failed ['test_gpu::test_x']",
        "self-check of tiny: differs by 3.1",
        "mfu on llama-3.1-8b at 16384 tokens: 0.310, target >= 0.5",
    ]
