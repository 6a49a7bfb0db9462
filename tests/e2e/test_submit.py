"""`ray job submit` end to end: a real Ray head on loopback, the README's command, the outputs
published. The head is this test's own (``ray start --head --block``) and only it is stopped."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

RAY = Path(sys.executable).with_name("ray")


def readme_submit_command() -> list[str]:
    """The README's one-machine `ray job submit` command, as words."""
    text = (REPO / "README.md").read_text()
    (line,) = re.findall(r"^ray job submit --address http://127\.0\.0\.1:8265 .*$", text, re.M)
    return shlex.split(line)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head with its job server on 127.0.0.1; yields the dashboard's address."""
    gcs, dashboard = _free_port(), _free_port()
    # every port of its own: another Ray on this machine (the tests' own) holds the defaults
    ports = [
        f"--{name}={_free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
        )
    ]
    # `ray start` records its cluster here for later ray.init() calls; put back what was there
    current = Path("/tmp/ray/ray_current_cluster")
    before = current.read_text() if current.exists() else None
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # the README's token setup: the job server refuses clients without it
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env['PATH']}"  # as in an activated virtualenv
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            # ready once a job can run: the job server and the node's job agent are both up
            probe = subprocess.run(
                [str(RAY), "job", "submit", "--address", address, "--", "python", "-c", "pass"],
                env=env, capture_output=True, text=True, check=False, timeout=120,
            )  # fmt: skip
            if probe.returncode == 0:
                break
            assert head.poll() is None, "the Ray head exited while starting"
            time.sleep(2)
        else:
            pytest.fail("the Ray head's job server did not come up")
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        if before is None:
            current.unlink(missing_ok=True)
        else:
            current.write_text(before)


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
