"""`ray job submit` end to end: a real Ray head on loopback, the README's command, the outputs
published. The head is this test's own (``tests/local_ray.py``) and only it is stopped."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time

import pytest

from tests.helpers import REPO
from tests.local_ray import RAY, LocalRay, free_port


def readme_submit_command() -> list[str]:
    """The README's one-machine `ray job submit` command, as words."""
    text = (REPO / "README.md").read_text()
    (line,) = re.findall(r"^ray job submit --address http://127\.0\.0\.1:8265 .*$", text, re.M)
    return shlex.split(line)


@pytest.fixture
def ray_head():
    """A Ray head with its job server on 127.0.0.1; yields the dashboard's address and the
    environment (with the README's token: the job server refuses clients without it)."""
    cluster = LocalRay()
    dashboard = free_port()
    try:
        cluster.start_head(
            2, "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            "--include-dashboard=true",
        )  # fmt: skip
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 180
        while time.time() < deadline:
            # ready once a job can run: the job server and the node's job agent are both up
            probe = subprocess.run(
                [str(RAY), "job", "submit", "--address", address, "--", "python", "-c", "pass"],
                env=cluster.env, capture_output=True, text=True, check=False, timeout=120,
            )  # fmt: skip
            if probe.returncode == 0:
                break
            assert cluster.nodes[0].poll() is None, "the Ray head exited while starting"
            time.sleep(2)
        else:
            pytest.fail("the Ray head's job server did not come up")
        yield address, cluster.env
    finally:
        cluster.stop()


@pytest.mark.slow  # starts a Ray head with its job server
def test_ray_job_submit_runs_the_readme_command_and_publishes(ray_head, tiny_student_dir, tmp_path):
    address, env = ray_head
    words = readme_submit_command()
    assert words[:5] == ["ray", "job", "submit", "--address", "http://127.0.0.1:8265"]
    assert words[words.index("--") :][1:3] == ["python", "jobs/score.py"]
    out = tmp_path / "submitted"
    words[0] = str(RAY)
    words[4] = address  # the test's own head, on a free port
    # The README's job as written, with a tiny student and an output folder of the test's own.
    words = [w for w in words if not w.startswith("output.path=")]
    words += [f"output.path={out}", f"student.model={tiny_student_dir}"]
    done = subprocess.run(
        words, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    demo_rows = sum(1 for line in (REPO / "ln_ray/demo/traces.jsonl").open() if line.strip())
    assert manifest["counts"]["rows_read"] == demo_rows
    assert manifest["counts"]["rows_scored"] > 0
    for name in ("scores", "selections", "teachers", "curated"):
        assert (out / manifest["outputs"][name]).exists()
