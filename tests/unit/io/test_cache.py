"""The score cache (ln_ray/io/cache.py): membership, what keys it, folding into buckets."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ln_ray.config import (
    ScoringConfig,
    load_config,
)
from ln_ray.io import cache
from ln_ray.schema import (
    CACHE_SCHEMA,
)
from ln_ray.score.student import check_student


def test_cache_membership():
    ids = np.unique(np.asarray(["b" * 32, "a" * 32, "c" * 32], dtype="S32"))
    assert cache.contains(ids, ["a" * 32, "d" * 32, "c" * 32]).tolist() == [True, False, True]
    assert cache.contains(np.array([], dtype="S32"), ["a" * 32]).tolist() == [False]


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
    }
    assert set(changed) == {f.name for f in dataclasses.fields(ScoringConfig)}
    for name, value in changed.items():
        other = cache.cache_key("student", dataclasses.replace(base, **{name: value}))
        assert (other == key) == (name in cache._NOT_IN_KEY), name
    assert cache.cache_key("another student", base) != key


def test_folding_keeps_one_row_per_trace_in_its_bucket(tmp_path):
    url = str(tmp_path / "cache")
    ids = [hashlib.sha256(str(n).encode()).hexdigest()[:32] for n in range(32)]
    buckets = cache.bucket_of(pa.array(ids), 4).to_pylist()
    assert buckets == [int(i[:12], 16) % 4 for i in ids] and set(buckets) == {0, 1, 2, 3}
    cache.write_part(url, _cache_rows(ids[:20], -1.0))
    cache.write_part(url, _cache_rows(ids[10:], -2.0))  # ten traces again (a retried batch)
    other = cache.write_part(url, _cache_rows(ids[:2], -1.0))  # a bucket of another count
    os.rename(other, os.path.join(url, cache.bucket_name(3, 16)))
    parts = cache.unfolded_files(url, 4)
    assert len(parts) == 3
    for bucket in range(4):
        rows = pa.concat_tables([pq.read_table(p) for p in parts])
        in_bucket = [b == bucket for b in cache.bucket_of(rows["trace_id"], 4).to_pylist()]
        mine = rows.filter(pa.array(in_bucket))
        cache.fold_bucket(url, bucket, 4, mine)
        cache.fold_bucket(url, bucket, 4, mine)  # folding again changes nothing
    for path in parts:
        os.remove(path)
    files = cache.cache_files(url)
    assert sorted(os.path.basename(p) for p in files) == [cache.bucket_name(b, 4) for b in range(4)]
    assert cache.unfolded_files(url, 4) == []
    stored = pa.concat_tables([pq.read_table(p) for p in files])
    assert sorted(stored["trace_id"].to_pylist()) == sorted(ids)  # each trace once
    for path in files:  # every row sits in its own bucket
        bucket = int(os.path.basename(path).split("-")[2].split(".")[0])
        assert set(cache.bucket_of(pq.read_table(path)["trace_id"], 4).to_pylist()) == {bucket}
    assert np.array_equal(cache.cached_trace_ids(url), np.unique(np.asarray(ids, dtype="S32")))


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
