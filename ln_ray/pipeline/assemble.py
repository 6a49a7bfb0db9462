"""Assemble every input row with its scores: the run's ``_rows/``, ``scores/`` and ``rejects/``.

Rows scored by this run come from ``_scored/`` with their scores. Rows whose trace was in the
cache come from ``_valid/`` and are joined with the cache; rows rejected at validation pass as
they are. Then later copies of a (prompt_id, teacher, response) are marked duplicates.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ln_ray.io import cache, storage
from ln_ray.pipeline import outputs
from ln_ray.pipeline.outputs import ROWS_DIR, RunPaths
from ln_ray.pipeline.passes import SCORED_DIR, VALID_DIR, read_valid
from ln_ray.pipeline.reduce import cast_to, reduce_partitions
from ln_ray.schema import (
    CACHE_SCHEMA,
    REJECTS_SCHEMA,
    ROW_META_SCHEMA,
    SCORED_ROWS_SCHEMA,
    SCORES_SCHEMA,
)


def assemble_rows(paths: RunPaths, cache_url: str, in_cache: int, scored: bool) -> tuple[Any, int]:
    """Complete every row with its scores, mark duplicates, write ``_rows/``, ``scores/`` and
    ``rejects/``, and remove the passes' working folders.

    Args:
        paths: The run's paths.
        cache_url: The score cache.
        in_cache: The number of distinct traces in the cache now.
        scored: Whether this run scored anything (``_scored/`` exists).

    Returns:
        The finished rows (materialized) and the number of duplicate rows rejected.
    """
    import ray

    partitions = reduce_partitions()
    valid = read_valid(paths)
    rows = valid.map_batches(_not_cached, batch_format="pyarrow")
    hits = valid.map_batches(_cached, batch_format="pyarrow").materialize()
    if hits.count():
        rows = rows.union(_join_cache(hits, cache_url, in_cache, partitions))
    if scored:
        rows = rows.union(
            ray.data.read_parquet(
                paths.staged(SCORED_DIR), filesystem=paths.arrow_fs, schema=SCORED_ROWS_SCHEMA
            )
        )
    keys = read_valid(paths, columns=["dup_key", "source_file", "row_number"])
    duplicates = _find_duplicates(keys, partitions)
    rows = rows.map_batches(
        _finish_rows, fn_kwargs={"duplicates": duplicates}, batch_format="pyarrow"
    ).materialize()
    rows.write_parquet(paths.staged(ROWS_DIR), filesystem=paths.arrow_fs)
    rows.map_batches(_scores_part, batch_format="pyarrow").write_parquet(
        paths.staged("scores"), filesystem=paths.arrow_fs
    )
    rows.map_batches(_rejects_part, batch_format="pyarrow").write_parquet(
        paths.staged("rejects"), filesystem=paths.arrow_fs
    )
    for name, schema in (
        (ROWS_DIR, SCORED_ROWS_SCHEMA),
        ("scores", SCORES_SCHEMA),
        ("rejects", REJECTS_SCHEMA),
    ):
        outputs.ensure_table(paths.fs, paths.staged(name), schema)
    for name in (VALID_DIR, SCORED_DIR):
        if paths.fs.exists(paths.staged(name)):
            paths.fs.rm(paths.staged(name), recursive=True)
    return rows, len(duplicates)


def is_unscored(table: pa.Table) -> pa.Array:
    """Accepted rows without scores (their trace was neither scored nor found in the cache)."""
    return pc.and_(pc.is_null(table["reject_reason"]), pc.is_null(table["n_tokens"]))


def _cached(table: pa.Table) -> pa.Table:
    """Validated rows to complete from the cache."""
    hit = pc.and_(pc.is_null(table["reject_reason"]), table["cached"])
    return table.filter(hit).select(ROW_META_SCHEMA.names)


def _not_cached(table: pa.Table) -> pa.Table:
    """Rows rejected at validation, in ``SCORED_ROWS_SCHEMA`` (no scores)."""
    rejected = table.filter(pc.is_valid(table["reject_reason"]))
    for field in SCORED_ROWS_SCHEMA:
        if field.name not in rejected.column_names:
            rejected = rejected.append_column(field, pa.nulls(rejected.num_rows, field.type))
    return rejected.select(SCORED_ROWS_SCHEMA.names).cast(SCORED_ROWS_SCHEMA)


def _join_cache(rows: Any, cache_url: str, in_cache: int, partitions: int) -> Any:
    """Rows (``ROW_META_SCHEMA``) with their scores from the cache, in ``SCORED_ROWS_SCHEMA``."""
    import ray

    cache_fs, _ = storage.filesystem(cache_url)
    scores = ray.data.read_parquet(
        cache.cache_files(cache_url),
        filesystem=storage.arrow_filesystem(cache_fs),
        schema=CACHE_SCHEMA,
    )
    if scores.count() > in_cache:
        # A retried batch or a duplicate row stored a trace twice (with equal values): keep one.
        scores = scores.groupby("trace_id", num_partitions=partitions).map_groups(
            lambda group: group.slice(0, 1), batch_format="pyarrow"
        )
    joined = rows.join(scores, "left_outer", num_partitions=partitions, on=("trace_id",))
    return joined.map_batches(cast_to(SCORED_ROWS_SCHEMA), batch_format="pyarrow")


def _find_duplicates(keys: Any, partitions: int) -> dict[tuple[str, int], str]:
    """Rows repeating an earlier (prompt_id, teacher, response): the reason, by (file, row).

    Args:
        keys: Every row's dup_key, source_file and row_number (dup_key null: rejected).
        partitions: Shuffle partitions.
    """

    def later_copies(group: pa.Table) -> pa.Table:
        ordered = group.sort_by([("source_file", "ascending"), ("row_number", "ascending")])
        first = ordered.slice(0, 1).to_pylist()[0]
        rest = ordered.slice(1)
        reason = f"duplicate of {first['source_file']} row {first['row_number']}"
        return rest.select(["source_file", "row_number"]).append_column(
            "reason", pa.array([reason] * rest.num_rows, pa.string())
        )

    copies = (
        keys.map_batches(lambda t: t.filter(pc.is_valid(t["dup_key"])), batch_format="pyarrow")
        .groupby("dup_key", num_partitions=partitions)
        .map_groups(later_copies, batch_format="pyarrow")
        .take_all()
    )
    return {(c["source_file"], c["row_number"]): c["reason"] for c in copies}


def _finish_rows(table: pa.Table, duplicates: dict[tuple[str, int], str]) -> pa.Table:
    reasons = table["reject_reason"]
    if duplicates:
        keys = zip(table["source_file"].to_pylist(), table["row_number"].to_pylist())
        marks = [duplicates.get(key) for key in keys]
        reasons = pc.coalesce(reasons, pa.array(marks, pa.string()))
    # A shard's read error may quote its URL.
    reasons = pc.replace_substring_regex(reasons, storage.USERINFO, storage.MASKED)
    index = table.schema.get_field_index("reject_reason")
    return (
        table.set_column(index, "reject_reason", reasons)
        .select(SCORED_ROWS_SCHEMA.names)
        .cast(SCORED_ROWS_SCHEMA)
    )


def _scores_part(table: pa.Table) -> pa.Table:
    return cast_to(SCORES_SCHEMA)(table.filter(pc.is_null(table["reject_reason"])))


def _rejects_part(table: pa.Table) -> pa.Table:
    rejected = table.filter(pc.is_valid(table["reject_reason"]))
    columns = ["source_file", "row_number", "prompt_id", "teacher", "reject_reason"]
    return rejected.select(columns).rename_columns(REJECTS_SCHEMA.names).cast(REJECTS_SCHEMA)
