"""The score cache: scores persisted per trace as soon as a batch is scored.

Scores are stored under ``<output.path>/_cache/<key>/``, where the key hashes the student's
identity (weights, tokenizer, chat template and its arguments, dtype), every scoring setting
that changes a score (the view and the reasoning presentation among them) and the version of
what a score means (``score/version.py``); the trace_id already hashes the trace's content, as
scored, and its steps.

Scoring actors write one ``part-*.parquet`` file per batch, atomically (a hidden temporary file
renamed into place, or a single object PUT), so a killed driver or actor never leaves a
half-written file behind and everything scored before an interruption is reused by the next run.
Once a run's scoring is done, the parts are folded into a fixed number of buckets (by a hash of
trace_id, ``output.cache_buckets``), one row per trace, and removed: the cache holds at most the
buckets plus the parts of runs in progress, however many refreshes there are. Until then a trace
scored twice (a retried batch, a duplicate row) may be stored twice, with equal values; readers
keep one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ln_ray.config import ScoringConfig
from ln_ray.io import storage
from ln_ray.schema import CACHE_SCHEMA
from ln_ray.score.version import SCORING_VERSION

# Scoring settings that decide only which rows are scored, never a score.
_NOT_IN_KEY = frozenset({"max_response_chars"})


def cache_key(student_identity: str, scoring: ScoringConfig) -> str:
    """The cache folder name for a student and the scoring settings that change scores.

    Every scoring setting is in the key but those in ``_NOT_IN_KEY``, so a new setting can
    never reuse scores computed without it; so is ``SCORING_VERSION``, so a change to the
    numbers never mixes old and new scores.
    """
    settings = {
        "student": student_identity,
        "scoring_version": SCORING_VERSION,
        **{k: v for k, v in dataclasses.asdict(scoring).items() if k not in _NOT_IN_KEY},
        "schema": CACHE_SCHEMA.names,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return digest[:20]


def cache_files(url: str) -> list[str]:
    """Completed cache files under ``url`` (paths inside the filesystem)."""
    fs, root = storage.filesystem(url)
    if not fs.exists(root):
        return []
    return sorted(
        p
        for p in fs.find(root)
        if p.endswith(".parquet") and not posixpath.basename(p).startswith(".")
    )


def cached_trace_ids(url: str) -> np.ndarray:
    """Sorted unique trace_ids already in the cache (a compact array for fast membership)."""
    fs, _ = storage.filesystem(url)
    files = cache_files(url)
    if not files:
        return np.array([], dtype="S32")
    table = pq.read_table(files, columns=["trace_id"], filesystem=storage.arrow_filesystem(fs))
    return np.unique(np.asarray(table["trace_id"].to_pylist(), dtype="S32"))


def stored_rows(url: str) -> int:
    """Rows in the cache's files, from their footers (once folded, one row per trace)."""
    fs, _ = storage.filesystem(url)
    arrow_fs = storage.arrow_filesystem(fs)
    return sum(pq.read_metadata(path, filesystem=arrow_fs).num_rows for path in cache_files(url))


def contains(sorted_ids: np.ndarray, trace_ids: list[str]) -> np.ndarray:
    """Boolean mask: which ``trace_ids`` are in ``sorted_ids``."""
    if len(sorted_ids) == 0 or not trace_ids:
        return np.zeros(len(trace_ids), dtype=bool)
    probe = np.asarray(trace_ids, dtype="S32")
    where = np.searchsorted(sorted_ids, probe).clip(max=len(sorted_ids) - 1)
    return sorted_ids[where] == probe


def write_part(url: str, table: pa.Table) -> str:
    """Publish one batch of scores as a new cache file; returns its path."""
    fs, root = storage.filesystem(url)
    fs.makedirs(root, exist_ok=True)
    final = storage.join(root, f"part-{uuid.uuid4().hex}.parquet")
    _write_atomically(fs, final, table.cast(CACHE_SCHEMA))
    return final


def bucket_name(bucket: int, buckets: int) -> str:
    """The file of one bucket; the bucket count is in the name, so files of another count are
    told apart (and folded like parts)."""
    return f"bucket-{buckets}-{bucket:05d}.parquet"


def unfolded_files(url: str, buckets: int) -> list[str]:
    """Cache files that are not buckets of ``buckets``: the parts written since the last fold
    (by this run, or by runs killed before folding theirs) and buckets of another count."""
    current = {bucket_name(b, buckets) for b in range(buckets)}
    return [p for p in cache_files(url) if posixpath.basename(p) not in current]


def bucket_of(trace_ids: pa.Array, buckets: int) -> pa.Array:
    """Each trace's bucket: its id (a SHA-256 hex prefix) read as a number, modulo ``buckets``."""
    return pa.array([int(t[:12], 16) % buckets for t in trace_ids.to_pylist()], pa.int64())


def with_bucket(table: pa.Table, buckets: int) -> pa.Table:
    """``table`` (with trace_id) and each row's bucket."""
    return table.append_column("bucket", bucket_of(table["trace_id"], buckets))


def read_bucket(url: str, bucket: int, buckets: int) -> pa.Table:
    """One bucket's rows (none when it has no file yet)."""
    fs, root = storage.filesystem(url)
    path = storage.join(root, bucket_name(bucket, buckets))
    if not fs.exists(path):
        return CACHE_SCHEMA.empty_table()
    return pq.read_table(path, filesystem=storage.arrow_filesystem(fs), schema=CACHE_SCHEMA)


def fold_bucket(url: str, bucket: int, buckets: int, new: pa.Table) -> tuple[int, int]:
    """Merge ``new`` cache rows into one bucket's file, one row per trace; returns the rows in
    the bucket and how many of them are new to it.

    The bucket's file is replaced in one step (a rename, or a single object PUT), so a reader
    sees the old bucket or the new one. Rows already in the bucket win over new copies (a trace's
    scores are the same either way).
    """
    import polars as pl

    fs, root = storage.filesystem(url)
    path = storage.join(root, bucket_name(bucket, buckets))
    old = read_bucket(url, bucket, buckets)
    before = old.num_rows
    new = pa.concat_tables([old, new.select(CACHE_SCHEMA.names).cast(CACHE_SCHEMA)])
    merged = pl.from_arrow(new).unique(subset="trace_id", keep="first", maintain_order=True)
    table = merged.to_arrow().cast(CACHE_SCHEMA)
    _write_atomically(fs, path, table)
    return table.num_rows, table.num_rows - before


def _write_atomically(fs: Any, final: str, table: pa.Table) -> None:
    arrow_fs = storage.arrow_filesystem(fs)
    storage.write_atomically(
        fs, final, lambda target: pq.write_table(table, target, filesystem=arrow_fs)
    )
