"""The score cache (ln_ray/io/cache.py): what keys it, folding into buckets."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from ln_ray.config import (
    ScoringConfig,
    load_config,
)
from ln_ray.io import cache
from ln_ray.schema import (
    CACHE_SCHEMA,
)
from ln_ray.score.student import check_student


def _cache_rows(ids: list[str], lalp: float) -> pa.Table:
    return pa.Table.from_pylist(
        [{"trace_id": i, "lalp": lalp, "n_tokens": 3, "step_chars": [1, 2]} for i in ids],
        schema=CACHE_SCHEMA,
    )


def test_every_scoring_setting_but_the_row_filter_is_in_the_cache_key():
    """The key is derived from the scoring config's fields: a new field changes it unless it is
    listed as deciding only which rows are scored."""
    import dataclasses

    base = ScoringConfig()
    key = cache.cache_key("student", base)
    changed = {
        "render": "conversation",
        "reasoning": "student",
        "window": 2,
        "window_fraction": 0.5,
        "rank_clip": 10,
        "max_tokens": 512,
        "max_response_chars": 10,
        "ifd": False,
    }
    assert set(changed) == {f.name for f in dataclasses.fields(ScoringConfig)}
    for name, value in changed.items():
        other = cache.cache_key("student", dataclasses.replace(base, **{name: value}))
        assert (other == key) == (name in cache._NOT_IN_KEY), name
    assert cache.cache_key("another student", base) != key


def test_folding_keeps_one_row_per_trace_in_its_bucket(tmp_path):
    store = cache.ScoreCache(str(tmp_path / "cache"))
    ids = [hashlib.sha256(str(n).encode()).hexdigest()[:32] for n in range(32)]
    buckets = cache.bucket_of(pa.array(ids), 4).to_pylist()
    assert buckets == [int(i[:12], 16) % 4 for i in ids] and set(buckets) == {0, 1, 2, 3}
    store.write_part(_cache_rows(ids[:20], -1.0))
    store.write_part(_cache_rows(ids[10:], -2.0))  # ten traces again (a retried batch)
    other = store.write_part(_cache_rows(ids[:2], -1.0))  # a bucket of another count
    store.mv(other, cache.bucket_name(3, 16))
    parts = store.unfolded(4)
    assert len(parts) == 3
    for bucket in range(4):
        rows = pa.concat_tables([store.read_table(p) for p in parts])
        in_bucket = [b == bucket for b in cache.bucket_of(rows["trace_id"], 4).to_pylist()]
        mine = rows.filter(pa.array(in_bucket))
        store.fold_bucket(bucket, 4, mine)
        store.fold_bucket(bucket, 4, mine)  # folding again changes nothing
    for name in parts:
        store.rm(name)
    files = store.files()
    assert files == [cache.bucket_name(b, 4) for b in range(4)]
    assert store.unfolded(4) == []
    stored = pa.concat_tables([store.read_table(name) for name in files])
    assert sorted(stored["trace_id"].to_pylist()) == sorted(ids)  # each trace once
    for name in files:  # every row sits in its own bucket
        bucket = int(name.split("-")[2].split(".")[0])
        assert set(cache.bucket_of(store.read_table(name)["trace_id"], 4).to_pylist()) == {bucket}
    assert np.array_equal(store.trace_ids(), np.unique(np.asarray(ids, dtype="S32")))
    assert store.stored_rows() == len(ids)


def test_parts_merge_into_one_file_and_leave_the_others(tmp_path):
    store = cache.ScoreCache(str(tmp_path / "cache"))
    names = [store.write_part(_cache_rows([f"{i:032x}"], -1.0 * i)) for i in range(5)]
    merged = store.merge_parts(names[:3])
    assert merged.startswith(cache.MERGED) and sorted(store.parts()) == sorted(names[3:])
    assert sorted(store.files()) == sorted([merged, *names[3:]])
    assert store.read_table(merged)["lalp"].to_pylist() == [0.0, -1.0, -2.0]
    assert store.unfolded(4) == store.files()  # merged files are folded at the run's end


def test_a_score_cache_travels_to_other_processes_as_it_is(tmp_path):
    """Ray tasks receive the cache pickled: the copy reads and writes the same folder."""
    import pickle
    import subprocess
    import sys

    store = cache.ScoreCache(str(tmp_path / "cache"))
    store.write_part(_cache_rows(["a" * 32], -1.0))
    code = (
        "import pickle, sys; store = pickle.loads(sys.stdin.buffer.read()); "
        "print(store.url, len(store.files()), store.trace_ids().tolist())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(store), capture_output=True, check=True
    )
    assert done.stdout.decode().split() == [store.url, "1", "[b'" + "a" * 32 + "']"]


def test_the_view_and_the_template_arguments_key_the_cache(tiny_student_dir):
    from ln_ray.io.cache import cache_key

    cfg = load_config("default", [f"student.model={tiny_student_dir}"])
    identity = check_student(cfg.student).identity
    key = cache_key(identity, cfg.scoring)
    for override in (
        "scoring.render=conversation",
        "scoring.reasoning=student",
        "student.template_kwargs.enable_thinking=false",
        "student.reasoning_close=</think>",
    ):
        other = load_config("default", [f"student.model={tiny_student_dir}", override])
        assert (
            cache_key(
                check_student(other.student, view=other.scoring.render).identity, other.scoring
            )
            != key
        )
    # a setting that only decides which rows are scored keeps the key
    same = load_config(
        "default", [f"student.model={tiny_student_dir}", "scoring.max_response_chars=9"]
    )
    assert cache_key(check_student(same.student).identity, same.scoring) == key
