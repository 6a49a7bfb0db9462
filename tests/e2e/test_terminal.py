"""`ln-ray score` on a terminal, read as a person reads it: through a pseudo-terminal, one status
line redrawn at the bottom (stage, traces, model tokens, tokens/s, ETA) under the run's own log
lines, and no library warnings or Ray Data progress dumps."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

from tests.helpers import make_rows, write_jsonl

CLEAR = "\r\x1b[2K"


def _through_a_terminal(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``command`` with a pseudo-terminal (120 columns) as its stdin, stdout and stderr;
    its exit status and everything it wrote."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        command, stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True
    )
    os.close(follower)
    chunks, deadline, exited = [], time.time() + timeout, None
    while time.time() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: every writer has exited
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            # Ray's own processes may hold the terminal a little longer; what matters is written.
            exited = exited or time.time()
            if time.time() - exited > 2:
                break
    process.wait(timeout=max(1.0, deadline - time.time()))
    os.close(leader)
    return process.returncode, b"".join(chunks).decode("utf-8", "replace")


def _screen(text: str) -> tuple[list[str], list[str]]:
    """What a person saw: the lines left on the screen, and every status line drawn (the text
    that a carriage return and an erase replaced)."""
    lines, drawn, current = [], [], ""
    for part in text.replace("\r\n", "\n").split("\n"):
        frames = part.split(CLEAR)
        drawn += [frame for frame in frames[1:] if frame]
        current = frames[-1]
        lines.append(current)
    return [line for line in lines if line], drawn


def test_a_run_on_a_terminal_shows_one_status_line_and_its_own_log(tiny_student_dir, tmp_path):
    # Long enough that scoring lasts several redraws of the status line.
    rows = [{**row, "response": " ".join([row["response"]] * 12)} for row in make_rows(16)]
    write_jsonl(tmp_path / "in" / "traces.jsonl", rows)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["TERM"] = "xterm"
    command = [
        *(sys.executable, "-m", "ln_ray.cli", "score"),
        f"input.path={tmp_path / 'in'}",
        f"output.path={tmp_path / 'out'}",
        f"student.model={tiny_student_dir}",
        *("compute.batch_traces=2", "compute.token_budget=64", "selection.bootstrap_samples=50"),
    ]
    status, text = _through_a_terminal(command, env, timeout=600)
    assert status == 0, text[-3000:]
    left, drawn = _screen(text)
    # The status line: the stages in turn, and scoring's progress in model tokens with an ETA.
    stages = [frame.split()[2] for frame in drawn if frame.startswith("ln-ray | ")]
    assert {"read_validate", "lookup_cache", "tokenize_score", "assemble", "reduce"} <= set(stages)
    scoring = [f for f in drawn if f.startswith("ln-ray | tokenize_score") and "model tokens" in f]
    assert any("/48 traces, " in f and " model tokens (" in f for f in scoring), drawn
    assert any(f.split("ETA ")[-1][0].isdigit() for f in scoring if "ETA " in f), scoring
    shown = [frame for frame in drawn if frame.startswith("ln-ray | ")]
    assert all(len(frame) < 120 for frame in shown)  # never wider than the terminal
    # What stays on the screen: the run's own lines and its summary, no status line left over.
    assert any(line.startswith("INFO ln_ray.pipeline.job: run ") for line in left)
    done = "INFO ln_ray.pipeline.passes: scoring: 48 of 48 traces (100%), "
    assert any(line.startswith(done) and line.endswith(", done") for line in left), left
    assert not any(line.startswith("ln-ray | ") for line in left)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["rows_scored"] == len(rows)
    # Nothing a user cannot act on: no deprecation or library warnings, no Ray Data dumps.
    for noise in ("Warning", "deprecated", "Running Dataset", "Progress bars", "Token auth"):
        assert noise not in text, [line for line in left if noise in line]
    assert "Loading weights" not in text  # no library progress bars either
