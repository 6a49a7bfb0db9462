"""Publishing a run's outputs: all of them or none, and overlapping runs keep to their own."""

from __future__ import annotations

import json
import os
import time

import pytest

from ln_ray.pipeline.outputs import (
    MANIFEST,
    REDUCE_OUTPUTS,
    RUNS_DIR,
    SCORE_OUTPUTS,
    STALE_RUN_S,
    OutputError,
    RunPaths,
    discard,
    ensure_table,
    publish,
)
from ln_ray.schema import SCORES_SCHEMA

NAMES = (*SCORE_OUTPUTS, *REDUCE_OUTPUTS)


def staged_run(root: str, names: tuple[str, ...] = NAMES) -> RunPaths:
    paths = RunPaths.create(root)
    for name in names:
        ensure_table(paths.fs, paths.staged(name), SCORES_SCHEMA)
    return paths


def published_run_id(root: str) -> str:
    with open(os.path.join(root, MANIFEST)) as handle:
        return json.load(handle)["run_id"]


def test_overlapping_runs_each_publish_their_own_outputs(tmp_path):
    root = str(tmp_path / "out")
    first, second = staged_run(root), staged_run(root)
    publish(first, NAMES, {"run_id": first.run_id})
    assert published_run_id(root) == first.run_id
    assert not os.path.exists(first.staging) and os.path.exists(second.staging)

    publish(second, NAMES, {"run_id": second.run_id})
    assert published_run_id(root) == second.run_id
    assert sorted(os.listdir(root)) == sorted([*NAMES, MANIFEST])  # _runs/ went with the last run
    for name in NAMES:
        assert any(p.endswith(".parquet") for p in os.listdir(os.path.join(root, name)))


def test_a_run_missing_a_staged_output_publishes_nothing(tmp_path):
    root = str(tmp_path / "out")
    done = staged_run(root)
    publish(done, NAMES, {"run_id": done.run_id})
    broken = staged_run(root, SCORE_OUTPUTS)
    with pytest.raises(OutputError, match="selections"):
        publish(broken, NAMES, {"run_id": broken.run_id})
    assert published_run_id(root) == done.run_id  # the previous results stand
    discard(broken)
    assert not os.path.exists(os.path.join(root, RUNS_DIR))


def test_staging_areas_of_killed_runs_go_once_stale(tmp_path):
    root = str(tmp_path / "out")
    killed, running = staged_run(root, ("scores",)), staged_run(root, ("scores",))
    long_ago = time.time() - STALE_RUN_S - 60
    for folder, _, files in os.walk(killed.staging):
        for path in [folder, *(os.path.join(folder, f) for f in files)]:
            os.utime(path, (long_ago, long_ago))
    run = staged_run(root)
    publish(run, NAMES, {"run_id": run.run_id})
    assert not os.path.exists(killed.staging)
    assert os.path.exists(running.staging)
