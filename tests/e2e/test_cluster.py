"""The job on a Ray cluster of several nodes on this machine (``tests/local_ray.py``), all of
them on 127.0.0.1: a worker that joins after the driver has started."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import REPO, make_rows, read_output, write_jsonl
from tests.local_ray import LocalRay


class Output:
    """A process's output lines, collected as they come."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._reader.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, process: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while not any(text in line for line in self.lines):
            assert process.poll() is None, "".join(self.lines)[-4000:]
            assert time.time() < deadline, f"no {text!r} in:\n" + "".join(self.lines)[-4000:]
            time.sleep(0.2)

    def text(self) -> str:
        self._reader.join(timeout=10)
        return "".join(self.lines)


def _job(tmp_path, student: str, rows: list[dict], *settings: str) -> list[str]:
    """The job over ``rows`` (written to ``tmp_path/in``) into ``tmp_path/out``, as
    ``ray job submit`` would run it."""
    write_jsonl(tmp_path / "in" / "a.jsonl", rows)
    return [sys.executable, "jobs/score.py", f"input.path={tmp_path / 'in'}",
            f"output.path={tmp_path / 'out'}", f"student.model={student}",
            "compute.batch_traces=2", "compute.token_budget=256",
            "selection.bootstrap_samples=100", *settings]  # fmt: skip


@pytest.fixture
def local_ray():
    """A head node of one CPU; ``add_node`` adds workers."""
    cluster = LocalRay()
    try:
        cluster.start_head(1, "--include-dashboard=false")
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow  # starts a Ray cluster of two nodes
def test_the_job_waits_for_a_worker_that_joins_after_it_started(
    local_ray, tiny_student_dir, tmp_path
):
    rows = make_rows(n_prompts=2)
    driver = subprocess.Popen(
        _job(tmp_path, tiny_student_dir, rows, "compute.min_cpus=2", "compute.progress_s=5"),
        cwd=REPO, env=local_ray.driver_env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    output = Output(driver)
    try:
        output.wait_for("waiting for the cluster: it has 1 of 2 CPUs", driver, timeout_s=300)
        local_ray.add_node(1)
        driver.wait(timeout=600)
    except subprocess.TimeoutExpired:
        driver.kill()
        pytest.fail("the job did not finish:\n" + output.text()[-8000:])
    finally:
        if driver.poll() is None:
            driver.kill()
    log = output.text()
    assert driver.returncode == 0, log[-4000:]
    assert "Ray cluster: 2 CPUs" in log
    assert log.index("waiting for the cluster") < log.index("Ray cluster: 2 CPUs")
    assert len(read_output(str(tmp_path / "out"), "scores")) == len(rows)


@pytest.mark.slow  # starts a Ray head
def test_a_cluster_that_stays_too_small_fails_the_job_in_one_line(
    local_ray, tiny_student_dir, tmp_path
):
    done = subprocess.run(
        _job(tmp_path, tiny_student_dir, make_rows(n_prompts=1), "compute.min_gpus=2",
             "compute.wait_for_cluster_s=3"),
        cwd=REPO, env=local_ray.driver_env, text=True,
        capture_output=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "the Ray cluster has 0 of 2 GPUs after 3s" in done.stderr, done.stderr[-4000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    runs = tmp_path / "out" / "_runs"
    assert not runs.exists() or not list(runs.iterdir())  # the run's folder is removed


@pytest.mark.slow  # a cluster of three nodes, a job run twice
def test_a_worker_node_lost_while_scoring_costs_time_not_scores(tmp_path, tiny_student_dir):
    """The node the scoring runs on is killed mid-run (SIGKILL to its raylet and workers, as a
    preempted spot node dies) and a replacement joins: the job finishes, and its scores are a
    clean run's."""
    cluster = LocalRay()
    rows = make_rows(n_prompts=40)
    settings = ("compute.min_cpus=2", "compute.progress_s=1", "compute.batch_traces=1")
    try:
        cluster.start_head(0, "--include-dashboard=false")  # the driver's node, as a RayJob's head
        spot = cluster.add_node(2)
        driver = subprocess.Popen(
            _job(tmp_path / "lost", tiny_student_dir, rows, *settings),
            cwd=REPO, env=cluster.driver_env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        output = Output(driver)
        try:
            output.wait_for("scoring: ", driver, timeout_s=600)
            cluster.kill(spot)
            before_kill = "".join(output.lines)
            cluster.add_node(2)  # the replacement
            driver.wait(timeout=900)
        finally:
            if driver.poll() is None:
                driver.kill()
        log = output.text()
        assert driver.returncode == 0, log[-6000:]
        assert "scored " not in before_kill and "scored " in log  # killed while scoring
        clean = subprocess.run(
            _job(tmp_path / "clean", tiny_student_dir, rows, *settings),
            cwd=REPO, env=cluster.driver_env, text=True, capture_output=True, timeout=900,
        )  # fmt: skip
        assert clean.returncode == 0, clean.stderr[-6000:]
    finally:
        cluster.stop()
    lost_scores = read_output(str(tmp_path / "lost" / "out"), "scores")
    clean_scores = read_output(str(tmp_path / "clean" / "out"), "scores")
    assert len(lost_scores) == len(clean_scores) == len(rows)
    key = ["prompt_id", "teacher"]
    lost_scores = lost_scores.sort_values(key).reset_index(drop=True)
    clean_scores = clean_scores.sort_values(key).reset_index(drop=True)
    assert (lost_scores["trace_id"] == clean_scores["trace_id"]).all()
    for metric in ("lalp", "galp", "rsr", "avg_rank"):  # batching moves floats by 1e-6 at most
        assert (lost_scores[metric] - clean_scores[metric]).abs().max() < 1e-5, metric
    assert read_output(str(tmp_path / "lost" / "out"), "rejects").empty
