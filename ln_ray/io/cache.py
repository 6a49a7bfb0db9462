"""The score cache: scores persisted per trace as soon as a batch is scored.

Scores are stored under ``<output.path>/_cache/<key>/``, where the key hashes the student's
identity (weights, tokenizer, chat template and its arguments, dtype), every scoring setting
that changes a score (the view and the reasoning presentation among them) and the version of
what a score means (``score/version.py``); the trace_id already hashes the trace's content, as
scored, and its steps.

The cache is a ``ScoreCache``, a folder (``io/folder.py``) that pickles into the Ray tasks that
read and write it. Scoring actors write one ``part-*.parquet`` file per batch, atomically (a
hidden temporary file renamed into place, or a single object PUT), so a killed driver or actor
never leaves a half-written file behind and everything scored before an interruption is reused
by the next run. While a run scores, its parts are merged a few hundred at a time
(``ScoreCache.merge_parts``, ``output.merge_parts``), so that a run resumed after an
interruption finds a few merged files rather than one per scored batch. Once a run's scoring is
done, the parts are folded (``ScoreCache.compact``)
into a fixed number of buckets (by a hash of trace_id, ``output.cache_buckets``), one row per
trace, and removed: the cache holds at most the buckets plus the parts of runs in progress,
however many refreshes there are. Until then a trace scored twice (a retried batch, a duplicate
row) may be stored twice, with equal values; readers keep one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import posixpath
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ln_ray.config import ScoringConfig
from ln_ray.io.folder import Folder
from ln_ray.schema import CACHE_SCHEMA
from ln_ray.score.version import SCORING_VERSION

log = logging.getLogger(__name__)

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


class ScoreCache(Folder):
    """One score cache folder (``<output.path>/_cache/<key>/``).

    Args:
        url: The folder.
    """

    def files(self) -> list[str]:
        """Completed cache files (names relative to the cache)."""
        return self.parquet_files()

    def trace_ids(self) -> np.ndarray:
        """Sorted unique trace_ids already in the cache (a compact array for fast membership)."""
        files = self.files()
        if not files:
            return np.array([], dtype="S32")
        table = pq.read_table(
            [self.full(name) for name in files], columns=["trace_id"], filesystem=self.arrow_fs
        )
        return np.unique(np.asarray(table["trace_id"].to_pylist(), dtype="S32"))

    def stored_rows(self) -> int:
        """Rows in the cache's files, from their footers (once folded, one row per trace)."""
        arrow_fs = self.arrow_fs
        return sum(
            pq.read_metadata(self.full(name), filesystem=arrow_fs).num_rows for name in self.files()
        )

    def write_part(self, table: pa.Table) -> str:
        """Publish one batch of scores as a new cache file; returns its name."""
        name = f"{PART}{uuid.uuid4().hex}.parquet"
        self.write_table(name, table.cast(CACHE_SCHEMA))
        return name

    def parts(self) -> list[str]:
        """The parts scoring actors wrote (one per batch), not yet merged or folded."""
        return [name for name in self.files() if posixpath.basename(name).startswith(PART)]

    def merge_parts(self, names: list[str]) -> str:
        """Merge parts into one file and remove them; returns the merged file's name.

        The merged file is written first (atomically), the parts removed after: an interruption
        between the two leaves traces stored twice, with equal values, which every reader
        allows (the next fold keeps one).
        """
        table = pq.read_table(
            [self.full(name) for name in names], schema=CACHE_SCHEMA, filesystem=self.arrow_fs
        )
        merged = f"{MERGED}{uuid.uuid4().hex}.parquet"
        self.write_table(merged, table)
        for name in names:
            self.rm(name)
        return merged

    @contextlib.contextmanager
    def merging(self, every: int, period_s: float) -> Iterator[dict[str, int]]:
        """Within the block (a run's scoring), merge the parts ``every`` at a time, looked for
        each ``period_s``, one Ray task at a time (no CPU reserved: it reads and writes); the
        dict it yields counts the merges, once the block has ended.

        A merge that fails is logged and left: it costs only file count, and the fold at the
        run's end takes the parts as they are.
        """
        import ray

        merge = ray.remote(num_cpus=0)(_merge)
        merged = {"merges": 0, "parts_merged": 0}
        pending: list[tuple[Any, int]] = []
        done = threading.Event()

        def settle(timeout: float | None) -> None:
            ref, count = pending[0]
            if not ray.wait([ref], timeout=timeout)[0]:
                return
            pending.clear()
            try:
                ray.get(ref)
                merged["merges"] += 1
                merged["parts_merged"] += count
            except Exception as exc:
                log.warning("score cache: %d parts were not merged: %s", count, exc)

        def watch() -> None:
            while not done.wait(period_s):
                if pending:
                    settle(timeout=0)
                if not pending and len(parts := self.parts()) >= every:
                    pending.append((merge.remote(self, parts[:every]), every))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            yield merged
        finally:
            done.set()
            watcher.join()
            if pending:
                settle(timeout=None)

    def unfolded(self, buckets: int) -> list[str]:
        """Cache files that are not buckets of ``buckets``: the parts written since the last
        fold (by this run, or by runs killed before folding theirs) and buckets of another
        count."""
        current = {bucket_name(b, buckets) for b in range(buckets)}
        return [name for name in self.files() if posixpath.basename(name) not in current]

    def read_bucket(self, bucket: int, buckets: int, columns: list[str] | None = None) -> pa.Table:
        """One bucket's rows, ``columns`` only (default: all); none when it has no file yet."""
        name = bucket_name(bucket, buckets)
        schema = CACHE_SCHEMA if columns is None else pa.schema(map(CACHE_SCHEMA.field, columns))
        if not self.exists(name):
            return schema.empty_table()
        return self.read_table(name, columns=columns, schema=schema)

    def fold_bucket(self, bucket: int, buckets: int, new: pa.Table) -> tuple[int, int]:
        """Merge ``new`` cache rows into one bucket's file, one row per trace; returns the rows
        in the bucket and how many of them are new to it.

        The bucket's file is replaced in one step (a rename, or a single object PUT), so a reader
        sees the old bucket or the new one. Rows already in the bucket win over new copies (a
        trace's scores are the same either way).
        """
        import polars as pl

        old = self.read_bucket(bucket, buckets)
        before = old.num_rows
        new = pa.concat_tables([old, new.select(CACHE_SCHEMA.names).cast(CACHE_SCHEMA)])
        merged = pl.from_arrow(new).unique(subset="trace_id", keep="first", maintain_order=True)
        table = merged.to_arrow().cast(CACHE_SCHEMA)
        self.write_table(bucket_name(bucket, buckets), table)
        return table.num_rows, table.num_rows - before

    def dataset(self, files: list[str] | None = None) -> Any:
        """The cache's files (default: all of them) as a Ray dataset."""
        import ray

        names = self.files() if files is None else files
        return ray.data.read_parquet(
            [self.full(name) for name in names], filesystem=self.arrow_fs, schema=CACHE_SCHEMA
        )

    def compact(self, buckets: int, partitions: int) -> dict[str, Any]:
        """Fold every unfolded file into the buckets (Ray tasks, one a bucket), then remove it.

        The parts are read, grouped by bucket, and each group is merged into its bucket's file
        (``fold_bucket``); the folded parts are removed only once every bucket is written, so a
        run killed while folding loses nothing (its parts are folded again next time, and rows
        already in a bucket are kept once).

        Args:
            buckets: The bucket count (``output.cache_buckets``).
            partitions: Shuffle partitions for the grouping by bucket.

        Returns:
            What was done: files folded, buckets written, rows in them, traces new to the
            buckets (scored by this run, or by a run killed before it folded), seconds.
        """
        started = time.time()
        files = self.unfolded(buckets)
        if not files:
            return {"files_folded": 0, "buckets_written": 0, "traces_added": 0, "seconds": 0.0}
        written = (
            self.dataset(files)
            .map_batches(with_bucket, fn_kwargs={"buckets": buckets}, batch_format="pyarrow")
            .groupby("bucket", num_partitions=partitions)
            .map_groups(
                _fold, fn_kwargs={"cache": self, "buckets": buckets}, batch_format="pyarrow"
            )
            .take_all()
        )
        for name in files:
            self.rm(name)
        log.info("score cache: folded %d files into %d buckets", len(files), len(written))
        return {
            "files_folded": len(files),
            "buckets_written": len(written),
            "rows_in_written_buckets": sum(row["rows"] for row in written),
            "traces_added": sum(row["added"] for row in written),
            "seconds": round(time.time() - started, 3),
        }


def _merge(cache: ScoreCache, names: list[str]) -> str:
    return cache.merge_parts(names)


def _fold(group: pa.Table, cache: ScoreCache, buckets: int) -> pa.Table:
    bucket = group["bucket"][0].as_py()
    rows, added = cache.fold_bucket(bucket, buckets, group.drop_columns(["bucket"]))
    return pa.table({"bucket": [bucket], "rows": [rows], "added": [added]})


PART, MERGED = "part-", "merged-"  # a batch's scores; parts merged while a run scores


def bucket_name(bucket: int, buckets: int) -> str:
    """The file of one bucket; the bucket count is in the name, so files of another count are
    told apart (and folded like parts)."""
    return f"bucket-{buckets}-{bucket:05d}.parquet"


def bucket_of(trace_ids: pa.Array, buckets: int) -> pa.Array:
    """Each trace's bucket: its id (a SHA-256 hex prefix) read as a number, modulo ``buckets``."""
    return pa.array([int(t[:12], 16) % buckets for t in trace_ids.to_pylist()], pa.int64())


def with_bucket(table: pa.Table, buckets: int) -> pa.Table:
    """``table`` (with trace_id) and each row's bucket."""
    return table.append_column("bucket", bucket_of(table["trace_id"], buckets))
