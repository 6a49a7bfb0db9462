"""Which validated rows need the student, found in the score cache bucket by bucket.

Every accepted row of ``_valid/`` is grouped by its trace's cache bucket (a hash of trace_id,
``io/cache.py``); each group reads that bucket's trace ids alone and keeps the rows whose trace
the bucket does not hold. Every copy of a trace falls in the same bucket, so the same group picks
each new trace's first copy (smallest source_file, row_number) to score and marks the others as
its repeats: a trace costs model time once, however many files and batches hold it. Nothing that
grows with the corpus or the cache reaches the driver or is sent to every task. The rows found
are written to the run's ``_new/`` (``NEW_ROWS_SCHEMA``), sorted by the ``_valid/`` file that
holds them, so that each tokenizing task reads the part for its own file alone (``to_score``).

The lookup reads buckets only, so the cache must be folded first (``ScoreCache.compact``): a
run resumed after an interruption folds the parts its predecessor left before it looks up.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ln_ray.io.cache import ScoreCache, with_bucket
from ln_ray.io.manifest import NEW_DIR
from ln_ray.io.run_folder import RunFolder
from ln_ray.pipeline.ray_ops import collect, read_valid, reduce_partitions, write_dataset
from ln_ray.schema import NEW_ROWS_SCHEMA, ROW_KEY, row_keys

SCORE, REPEAT = "score", "repeat"  # a new row's status: its trace's first copy, or another
_LOOKUP_KEYS = ["trace_id", *ROW_KEY, "reject_reason"]
_FIRST = {"source_file": "first_file", "row_number": "first_row", "item": "first_item"}


@dataclass(frozen=True)
class NewRows:
    """What the lookup found: rows to score (one per new trace) and rows repeating one."""

    to_score: int
    repeats: int


def find_new_rows(run: RunFolder, cache: ScoreCache, buckets: int) -> NewRows:
    """Write the run's ``_new/``: its accepted rows whose trace ``cache`` does not hold.

    Args:
        run: The run's folder, with its ``_valid/``.
        cache: The score cache, folded into ``buckets`` buckets.
        buckets: The cache's bucket count (``output.cache_buckets``).

    Returns:
        How many rows are to score and how many repeat one of them.
    """
    partitions = reduce_partitions()
    found = (
        read_valid(run, columns=_LOOKUP_KEYS, blocks=partitions, include_paths=True)
        .map_batches(_accepted, fn_kwargs={"buckets": buckets}, batch_format="pyarrow")
        .groupby("bucket", num_partitions=partitions)
        .map_groups(
            _new_in_bucket, fn_kwargs={"cache": cache, "buckets": buckets}, batch_format="pyarrow"
        )
        .materialize()
    )
    if found.count():
        # Sorted by _valid/ file, in files of a few blocks: a tokenizing task's filter on its
        # own file reads one or two of them (the others are skipped by their statistics).
        write_dataset(found.sort(["valid_file", "row_number", "item"]), run, NEW_DIR)
    run.ensure_table(NEW_DIR, NEW_ROWS_SCHEMA)
    counts = collect(
        found.map_batches(_count_status, batch_format="pyarrow"), _STATUS_COUNTS
    ).to_pylist()
    total = {status: 0 for status in (SCORE, REPEAT)}
    for entry in counts:
        total[entry["status"]] += entry["rows"]
    return NewRows(to_score=total[SCORE], repeats=total[REPEAT])


def to_score(run: RunFolder, valid_file: str) -> pa.Array:
    """Row keys (``schema.row_keys``) of the rows to score in one file of ``_valid/``."""
    chosen = run.read_table(
        NEW_DIR,
        columns=list(ROW_KEY),
        schema=NEW_ROWS_SCHEMA,
        filters=[("valid_file", "=", posixpath.basename(valid_file)), ("status", "=", SCORE)],
    )
    return row_keys(chosen)


def new_row_keys(run: RunFolder) -> Any:
    """The ``_new/`` rows' row keys (source_file, row_number, item), as a dataset (the rows
    this run found new, scored or repeating a scored one)."""
    import ray

    schema = pa.schema([NEW_ROWS_SCHEMA.field(name) for name in ROW_KEY])
    return ray.data.read_parquet(
        run.full(NEW_DIR), filesystem=run.arrow_fs, columns=list(ROW_KEY), schema=schema
    )


def _accepted(rows: pa.Table, buckets: int) -> pa.Table:
    """Accepted rows, with the ``_valid/`` file that holds them and their trace's bucket."""
    rows = rows.filter(pc.is_null(rows["reject_reason"]))
    names = pa.array([posixpath.basename(p) for p in rows["path"].to_pylist()], pa.string())
    return with_bucket(
        pa.table(
            {
                "valid_file": names,
                "trace_id": rows["trace_id"],
                **{name: rows[name] for name in ROW_KEY},
            }
        ),
        buckets,
    )


def _new_in_bucket(group: pa.Table, cache: ScoreCache, buckets: int) -> pa.Table:
    """The rows of one bucket whose trace the bucket does not hold, each with its status."""
    stored = cache.read_bucket(group["bucket"][0].as_py(), buckets, columns=["trace_id"])
    new = group.filter(pc.invert(pc.is_in(group["trace_id"], value_set=stored["trace_id"])))
    frame = pl.from_arrow(new.drop_columns(["bucket"]))
    assert isinstance(frame, pl.DataFrame)
    frame = frame.sort(["trace_id", *ROW_KEY], nulls_last=False).with_columns(
        **{first: pl.col(name).first().over("trace_id") for name, first in _FIRST.items()}
    )
    first = pl.all_horizontal(
        pl.col(name).eq_missing(pl.col(first)) for name, first in _FIRST.items()
    )
    frame = frame.with_columns(
        status=pl.when(first).then(pl.lit(SCORE)).otherwise(pl.lit(REPEAT)),
        **{name: pl.when(first).then(None).otherwise(pl.col(name)) for name in _FIRST.values()},
    )
    return frame.to_arrow().select(NEW_ROWS_SCHEMA.names).cast(NEW_ROWS_SCHEMA)


_STATUS_COUNTS = pa.schema([("status", pa.string()), ("rows", pa.int64())])


def _count_status(rows: pa.Table) -> pa.Table:
    counted = rows.group_by("status", use_threads=False).aggregate([("status", "count")])
    return pa.table(
        {"status": counted["status"], "rows": counted["status_count"]}, schema=_STATUS_COUNTS
    )
