"""Every module ships: a wheel (not only an editable install) must carry each subpackage."""

from __future__ import annotations

from pathlib import Path

import pytest
from setuptools import find_packages

from tests.helpers import REPO


def test_every_folder_of_modules_is_a_package():
    found = set(find_packages(str(REPO), include=["ln_ray*"]))
    folders = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "ln_ray").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert folders <= found, folders - found


@pytest.mark.slow  # builds and installs the wheel, then runs a job
def test_the_built_wheel_scores_from_outside_the_checkout(tiny_student_dir, tmp_path):
    """The wheel alone (its configs included) runs `ln-ray score` with a local Ray, with
    neither the checkout on the path nor its folder as the working directory."""
    import json
    import os
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(REPO)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("ln_ray-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    assert (target / "ln_ray" / "conf" / "default.yaml").is_file()
    rows = [
        {"prompt_id": f"q{i}", "prompt": "What is 3 * 2 + 4?", "teacher": teacher,
         "response": f"First, 3 * 2 = 6. Then 6 + 4 = 10. So the answer is {10 + i}."}
        for i in range(3) for teacher in ("alpha", "beta")
    ]  # fmt: skip
    data = tmp_path / "data"
    data.mkdir()
    (data / "traces.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(target)  # before the editable install of the checkout
    run = tmp_path / "elsewhere"
    run.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import ln_ray; print(ln_ray.__file__)"],
        check=True, cwd=run, env=env, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(target)
    done = subprocess.run(
        [sys.executable, "-m", "ln_ray.cli", "score", f"input.path={data}",
         f"output.path={tmp_path / 'out'}", f"student.model={tiny_student_dir}"],
        cwd=run, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["rows_scored"] == len(rows)
