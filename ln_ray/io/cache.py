"""The score cache: scores persisted per trace as soon as a batch is scored.

Scores are stored under ``<output.path>/_cache/<key>/``, where the key hashes the student's
identity (weights, tokenizer, chat template and its arguments, dtype) and every scoring setting
that changes a score (the view and the reasoning presentation among them); the trace_id already
hashes the trace's content, as scored, and its steps. Scoring actors write one Parquet file per
batch, atomically (a hidden temporary file renamed into place, or a single object PUT), so a
killed driver or actor never leaves a half-written file behind and everything scored before an
interruption is reused by the next run.
A trace scored twice (a retried batch, a duplicate row) is stored twice with equal values; readers
keep one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ln_ray.config import ScoringConfig
from ln_ray.io import storage
from ln_ray.schema import CACHE_SCHEMA

# Scoring settings that decide only which rows are scored, never a score.
_NOT_IN_KEY = frozenset({"max_response_chars"})


def cache_key(student_identity: str, scoring: ScoringConfig) -> str:
    """The cache folder name for a student and the scoring settings that change scores.

    Every scoring setting is in the key but those in ``_NOT_IN_KEY``, so a new setting can
    never reuse scores computed without it.
    """
    settings = {
        "student": student_identity,
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
    name = f"part-{uuid.uuid4().hex}.parquet"
    final = storage.join(root, name)
    table = table.cast(CACHE_SCHEMA)
    if storage.protocol(fs) == "file":
        staging = storage.join(root, f".tmp-{name}")
        pq.write_table(table, staging, filesystem=storage.arrow_filesystem(fs))
        fs.mv(staging, final)
    else:  # an object store makes the object visible only once the upload completes
        pq.write_table(table, final, filesystem=storage.arrow_filesystem(fs))
    return final
