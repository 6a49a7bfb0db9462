"""Fold the score cache's parts into its buckets once a run has scored (Ray tasks, one a bucket).

The parts (``part-*.parquet``, one per scored batch, also those a killed run left) are read,
grouped by bucket, and each group is merged into its bucket's file (``cache.fold_bucket``); the
folded parts are removed only once every bucket is written, so a run killed while folding loses
nothing (its parts are folded again next time, and rows already in a bucket are kept once).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from ln_ray.io import cache, storage
from ln_ray.pipeline.reduce import reduce_partitions
from ln_ray.schema import CACHE_SCHEMA

log = logging.getLogger(__name__)


def compact_cache(cache_url: str, buckets: int) -> dict[str, Any]:
    """Fold every unfolded cache file into the buckets, then remove it.

    Returns:
        What was done: files folded, buckets written, rows in them, traces new to the buckets
        (scored by this run, or by a run killed before it folded), seconds.
    """
    import ray

    started = time.time()
    files = cache.unfolded_files(cache_url, buckets)
    if not files:
        return {"files_folded": 0, "buckets_written": 0, "traces_added": 0, "seconds": 0.0}
    fs, _ = storage.filesystem(cache_url)
    written = (
        ray.data.read_parquet(files, filesystem=storage.arrow_filesystem(fs), schema=CACHE_SCHEMA)
        .map_batches(cache.with_bucket, fn_kwargs={"buckets": buckets}, batch_format="pyarrow")
        .groupby("bucket", num_partitions=reduce_partitions())
        .map_groups(
            _fold, fn_kwargs={"cache_url": cache_url, "buckets": buckets}, batch_format="pyarrow"
        )
        .take_all()
    )
    for path in files:
        fs.rm(path)
    summary = {
        "files_folded": len(files),
        "buckets_written": len(written),
        "rows_in_written_buckets": sum(row["rows"] for row in written),
        "traces_added": sum(row["added"] for row in written),
        "seconds": round(time.time() - started, 3),
    }
    log.info("score cache: folded %d files into %d buckets", len(files), len(written))
    return summary


def _fold(group: pa.Table, cache_url: str, buckets: int) -> pa.Table:
    bucket = group["bucket"][0].as_py()
    rows, added = cache.fold_bucket(cache_url, bucket, buckets, group.drop_columns(["bucket"]))
    return pa.table({"bucket": [bucket], "rows": [rows], "added": [added]})
