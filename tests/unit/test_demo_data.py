"""The bundled demo data is what scripts/demo_data.py writes (a build-time script)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_the_bundled_demo_data_is_up_to_date():
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo_data.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_a_stale_copy_is_caught(tmp_path):
    stale = tmp_path / "traces.jsonl"
    stale.write_text((REPO / "ln_ray" / "demo" / "traces.jsonl").read_text()[:-200])
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo_data.py"), "--check", "--out", str(stale)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and "out of date" in done.stderr
