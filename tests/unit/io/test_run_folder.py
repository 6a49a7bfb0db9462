"""Publishing a run (ln_ray/io/run_folder.py): one atomic pointer write, nothing copied, the
previous results readable whatever fails, overlapping runs keep to their own folders, old runs
are tidied away; and the typed manifest that every layout is read through (io/manifest.py)."""

from __future__ import annotations

import json
import os
import pickle
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ln_ray.io.folder import Folder
from ln_ray.io.lease import Lease
from ln_ray.io.manifest import (
    LAYOUT,
    MANIFEST,
    REDUCE_OUTPUTS,
    RUNS_DIR,
    SCORE_OUTPUTS,
    RunManifest,
)
from ln_ray.io.run_folder import (
    FAILED_RUN_S,
    STALE_RUN_S,
    OutputError,
    OutputRoot,
    PublishedRun,
    RunFolder,
)

NAMES = (*SCORE_OUTPUTS, *REDUCE_OUTPUTS)
_SCHEMA = pa.schema([("run", pa.string())])


def staged_run(root: str, names: tuple[str, ...] = NAMES) -> RunFolder:
    """A run whose every output is one Parquet file naming the run."""
    run = OutputRoot(root).new_run()
    for name in names:
        run.write_table(f"{name}/part-0.parquet", pa.table({"run": [run.run_id]}, schema=_SCHEMA))
    return run


def published(root: str) -> dict[str, str]:
    """What a reader sees: per output, the run whose data it holds (read through the pointer)."""
    run = PublishedRun.open(root)
    return {
        name: run.root.read_table(run.manifest.located(name))["run"][0].as_py() for name in NAMES
    }


def run_manifest(run: RunFolder, finished_at: str = "2026-12-01T00:00:00+00:00") -> RunManifest:
    return RunManifest(run_id=run.run_id, finished_at=finished_at)


def test_publishing_writes_one_pointer_and_copies_nothing(tmp_path):
    root = str(tmp_path / "out")
    first = staged_run(root)
    staged_files = {p for p in (tmp_path / "out").rglob("*.parquet")}
    manifest = first.publish(NAMES, run_manifest(first))
    assert published(root) == dict.fromkeys(NAMES, first.run_id)
    assert manifest.run_path == f"{RUNS_DIR}/{first.run_id}"
    assert {p for p in (tmp_path / "out").rglob("*.parquet")} == staged_files  # nothing copied
    assert sorted(os.listdir(root)) == [RUNS_DIR, MANIFEST]
    # the run's folder keeps its own manifest: it marks the run finished
    own = json.loads((tmp_path / "out" / RUNS_DIR / first.run_id / MANIFEST).read_text())
    assert own == json.loads((tmp_path / "out" / MANIFEST).read_text())


def test_overlapping_runs_each_publish_their_own_outputs(tmp_path):
    root = str(tmp_path / "out")
    first, second = staged_run(root), staged_run(root)
    first.publish(NAMES, run_manifest(first))
    assert published(root) == dict.fromkeys(NAMES, first.run_id)
    assert os.path.exists(second.full())  # the other run's folder is left alone
    second.publish(NAMES, run_manifest(second, "2026-12-01T01:00:00+00:00"))
    assert published(root) == dict.fromkeys(NAMES, second.run_id)
    assert os.path.exists(first.full())  # kept: among the newest output.keep_runs


def test_a_select_run_publishes_its_outputs_beside_the_scores(tmp_path):
    root = str(tmp_path / "out")
    scoring = staged_run(root)
    manifest = scoring.publish(NAMES, run_manifest(scoring))
    selecting = staged_run(root, REDUCE_OUTPUTS)
    selecting.publish(REDUCE_OUTPUTS, manifest.replace(run_id=selecting.run_id))
    seen = published(root)
    assert {seen[name] for name in SCORE_OUTPUTS} == {scoring.run_id}
    assert {seen[name] for name in REDUCE_OUTPUTS} == {selecting.run_id}
    # a run the pointer names is never tidied away, however many runs follow
    for hour in range(1, 5):
        run = staged_run(root, REDUCE_OUTPUTS)
        current = PublishedRun.open(root).manifest
        run.publish(REDUCE_OUTPUTS, current.replace(finished_at=f"2026-12-01T0{hour}:00:00"), 2)
    assert {published(root)[name] for name in SCORE_OUTPUTS} == {scoring.run_id}
    runs = os.listdir(os.path.join(root, RUNS_DIR))
    assert scoring.run_id in runs and len(runs) == 3  # the scores' run and the newest two


def test_only_the_newest_runs_are_kept(tmp_path):
    root = str(tmp_path / "out")
    ids = []
    for hour in range(5):
        run = staged_run(root)
        run.publish(NAMES, run_manifest(run, f"2026-12-01T0{hour}:00:00+00:00"), keep_runs=2)
        ids.append(run.run_id)
    assert sorted(os.listdir(os.path.join(root, RUNS_DIR))) == sorted(ids[-2:])
    assert published(root) == dict.fromkeys(NAMES, ids[-1])


def test_a_run_missing_a_staged_output_publishes_nothing(tmp_path):
    root = str(tmp_path / "out")
    done = staged_run(root)
    done.publish(NAMES, run_manifest(done))
    broken = staged_run(root, SCORE_OUTPUTS)
    with pytest.raises(OutputError, match="selections"):
        broken.publish(NAMES, run_manifest(broken))
    assert published(root) == dict.fromkeys(NAMES, done.run_id)  # the previous results stand
    broken.discard()
    assert os.listdir(os.path.join(root, RUNS_DIR)) == [done.run_id]


def test_discarding_never_removes_the_published_run(tmp_path):
    root = str(tmp_path / "out")
    run = staged_run(root)
    run.publish(NAMES, run_manifest(run))
    run.discard()  # as after an interrupt that arrives once the pointer is written
    assert published(root) == dict.fromkeys(NAMES, run.run_id)


def _fail_at(monkeypatch, step: int) -> None:
    """Make the ``step``-th filesystem write of the next publish fail (0: the first)."""
    calls = {"n": 0}
    real_write = Folder.write_json

    def write_json(folder, name, payload):
        calls["n"] += 1
        if calls["n"] - 1 == step:
            raise OSError(f"injected failure at write {step}")
        return real_write(folder, name, payload)

    monkeypatch.setattr(Folder, "write_json", write_json)


@pytest.mark.parametrize("step", [0, 1])
def test_a_failure_at_each_publish_write_leaves_the_previous_results(tmp_path, monkeypatch, step):
    root = str(tmp_path / "out")
    before = staged_run(root)
    before.publish(NAMES, run_manifest(before))
    failing = staged_run(root)
    with monkeypatch.context() as patch:
        _fail_at(patch, step)  # 0: the run's own manifest, 1: the pointer
        with pytest.raises(OutputError, match="could not be published"):
            failing.publish(NAMES, run_manifest(failing))
    assert published(root) == dict.fromkeys(NAMES, before.run_id)
    failing.discard()
    assert not os.path.exists(failing.full())


def test_a_failure_while_writing_the_pointer_leaves_the_old_one_whole(tmp_path, monkeypatch):
    root = str(tmp_path / "out")
    before = staged_run(root)
    before.publish(NAMES, run_manifest(before))
    failing = staged_run(root)
    real_mv = type(failing.fs).mv

    def mv(self, source, target, *args, **kwargs):
        if target.endswith(MANIFEST) and RUNS_DIR not in target:
            raise OSError("killed before the rename")
        return real_mv(self, source, target, *args, **kwargs)

    monkeypatch.setattr(type(failing.fs), "mv", mv)
    with pytest.raises(OutputError):
        failing.publish(NAMES, run_manifest(failing))
    assert published(root) == dict.fromkeys(NAMES, before.run_id)
    assert not [p for p in os.listdir(root) if p.startswith(".")]  # no temporary left behind


def test_a_failure_while_tidying_keeps_the_new_run_published(tmp_path, monkeypatch):
    root = str(tmp_path / "out")
    run = staged_run(root)

    def broken(*args, **kwargs):
        raise OSError("listing failed")

    monkeypatch.setattr(OutputRoot, "remove_unlisted", broken)
    run.publish(NAMES, run_manifest(run))
    assert published(root) == dict.fromkeys(NAMES, run.run_id)


def test_publishing_on_an_object_store_is_one_put(s3_server, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("ln-ray-publish")
    root = "s3://ln-ray-publish/out"
    before = staged_run(root)
    before.publish(NAMES, run_manifest(before))
    copies = []
    monkeypatch.setattr(type(before.fs), "copy", lambda *a, **k: copies.append(a))
    failing = staged_run(root)
    with monkeypatch.context() as patch:
        _fail_at(patch, 1)
        with pytest.raises(OutputError):
            failing.publish(NAMES, run_manifest(failing))
    assert published(root) == dict.fromkeys(NAMES, before.run_id)
    after = staged_run(root)
    after.publish(NAMES, run_manifest(after, "2026-12-01T02:00:00+00:00"))
    fs.invalidate_cache()
    assert published(root) == dict.fromkeys(NAMES, after.run_id)
    assert copies == []  # no object was copied


def test_outputs_published_at_the_top_before_go_with_the_first_new_run(tmp_path):
    root = tmp_path / "out"
    for name in NAMES:  # the layout an earlier ln-ray published
        (root / name).mkdir(parents=True)
        pq.write_table(pa.table({"run": ["old"]}, schema=_SCHEMA), root / name / "part-0.parquet")
    (root / MANIFEST).write_text(json.dumps({"run_id": "old"}))
    assert published(str(root)) == dict.fromkeys(NAMES, "old")  # readable as it was
    run = staged_run(str(root))
    run.publish(NAMES, run_manifest(run))
    assert published(str(root)) == dict.fromkeys(NAMES, run.run_id)
    assert sorted(os.listdir(root)) == [RUNS_DIR, MANIFEST]


def test_a_select_over_outputs_published_at_the_top_keeps_the_scores_there(tmp_path):
    root = tmp_path / "out"
    for name in NAMES:
        (root / name).mkdir(parents=True)
        pq.write_table(pa.table({"run": ["old"]}, schema=_SCHEMA), root / name / "part-0.parquet")
    (root / MANIFEST).write_text(json.dumps({"run_id": "old"}))
    run = staged_run(str(root), REDUCE_OUTPUTS)
    run.publish(REDUCE_OUTPUTS, PublishedRun.open(str(root)).manifest.replace(run_id=run.run_id))
    seen = published(str(root))
    assert {seen[name] for name in SCORE_OUTPUTS} == {"old"}
    assert {seen[name] for name in REDUCE_OUTPUTS} == {run.run_id}
    assert not any((root / name).exists() for name in REDUCE_OUTPUTS)


def _age(folder: str, seconds: float) -> None:
    """Make everything under ``folder`` last change ``seconds`` before now."""
    then = time.time() - seconds
    for parent, _, files in os.walk(folder):
        for path in [parent, *(os.path.join(parent, f) for f in files)]:
            os.utime(path, (then, then))


def test_folders_of_killed_runs_go_once_stale(tmp_path):
    root = str(tmp_path / "out")
    killed, running = staged_run(root, ("scores",)), staged_run(root, ("scores",))
    _age(killed.full(), STALE_RUN_S + 60)
    run = staged_run(root)
    run.publish(NAMES, run_manifest(run))
    assert not os.path.exists(killed.full())
    assert os.path.exists(running.full())


def test_clean_up_never_removes_the_folder_of_a_live_run_however_long_it_has_run(tmp_path):
    """The clock is the test's: 30 hours pass while one run scores without writing to its
    folder (its scores go to the cache), its lease alive."""
    root = str(tmp_path / "out")
    started = time.time()
    live, killed, failed = (staged_run(root, ("scores",)) for _ in range(3))
    failed.record_failure({"error": "too many rejects"})
    run = staged_run(root)
    run.publish(NAMES, run_manifest(run))
    now = started + 30 * 3600
    lease = Lease(root, live.run_id, "score", timeout_s=600, clock=lambda: now)
    lease.acquire()  # its heartbeat: now

    run.root.remove_unlisted(run.run_id, keep_runs=3, now=now)
    assert os.path.exists(live.full())  # 30 hours unchanged, but its run is alive
    assert not os.path.exists(killed.full())  # 30 hours unchanged, nobody's
    assert os.path.exists(failed.full())  # a failed run's rejects stay a week

    run.root.remove_unlisted(
        run.run_id, keep_runs=3, now=now + 601
    )  # the live run missed its heartbeat
    assert not os.path.exists(live.full()) and os.path.exists(failed.full())
    run.root.remove_unlisted(run.run_id, keep_runs=3, now=started + FAILED_RUN_S + 60)
    assert not os.path.exists(failed.full()) and os.path.exists(run.full())


def test_nothing_published_is_said_plainly(tmp_path):
    with pytest.raises(OutputError, match="no finished run"):
        PublishedRun.open(str(tmp_path / "nothing"))


def test_a_run_folder_travels_to_other_processes_as_it_is(tmp_path):
    run = staged_run(str(tmp_path / "out"), ("scores",))
    copy = pickle.loads(pickle.dumps(run))
    assert (copy.url, copy.run_id, copy.root.url) == (run.url, run.run_id, run.root.url)
    assert copy.parquet_files("scores") == ["scores/part-0.parquet"]


def test_the_manifest_reads_every_layout_and_writes_what_it_read(tmp_path):
    # layout 1: the outputs at the top, no teacher pairs or stability, the text in _rows/
    old = RunManifest.from_json({"run_id": "old", "counts": {"rows_read": 3}})
    assert old.layout == 1 and old.located("scores") == "scores"
    assert old.has("scores") and not old.has("teacher_pairs") and not old.has("_valid")
    assert old.text_output == "_rows"
    # layout 2: a folder per run, each output located
    located = {name: f"{RUNS_DIR}/abc/{name}" for name in NAMES}
    two = RunManifest.from_json(
        {"run_id": "abc", "run_path": f"{RUNS_DIR}/abc", "outputs": located}
    )
    assert two.layout == 2 and two.located("teachers") == f"{RUNS_DIR}/abc/teachers"
    assert two.text_output == "_valid" and two.has("teacher_stability")
    # what this version writes, and keys a later version adds, survive a round trip
    doc = {**two.to_json(), "layout": LAYOUT, "later_key": {"x": 1}}
    assert RunManifest.from_json(doc).to_json() == doc
    assert RunManifest.from_json(doc).layout == LAYOUT


def test_a_published_run_reads_tables_where_the_pointer_says(tmp_path):
    root = str(tmp_path / "out")
    run = staged_run(root)
    run.publish(NAMES, run_manifest(run))
    reader = PublishedRun.open(root)
    assert reader.manifest.run_id == run.run_id and reader.manifest.layout == LAYOUT
    assert reader.table("teachers")["run"].tolist() == [run.run_id]
    assert reader.full("scores") == run.full("scores")
    # a run published before teacher_pairs/ existed reads it as empty
    legacy = reader.manifest.replace(outputs={"scores": reader.manifest.outputs["scores"]})
    assert PublishedRun(reader.root, legacy).table("teacher_pairs").empty
