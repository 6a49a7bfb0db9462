"""Assemble every input row with its scores: the run's ``_rows/``, ``scores/`` and ``rejects/``.

Only narrow columns travel here (provenance, ids, scores); the rows' text stays in ``_valid/``.

Rows scored by this run come from ``_scored/`` with their scores. Rows whose trace was in the
cache come from ``_valid/`` and are joined with the cache; rows rejected at validation pass as
they are. Then later copies of a (prompt_id, teacher, response) are marked duplicates.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ln_ray.io import cache, storage
from ln_ray.pipeline import outputs
from ln_ray.pipeline.outputs import ROWS_DIR, RunPaths
from ln_ray.pipeline.passes import SCORED_DIR, read_valid
from ln_ray.pipeline.reduce import cast_to, collect, reduce_partitions
from ln_ray.schema import (
    CACHE_SCHEMA,
    REJECTS_SCHEMA,
    ROW_META_SCHEMA,
    SCORED_ROWS_SCHEMA,
    SCORES_SCHEMA,
    row_keys,
)


def assemble_rows(paths: RunPaths, cache_url: str, in_cache: int, scored: bool) -> tuple[Any, int]:
    """Complete every row with its scores (not its text, which stays in ``_valid/``), mark
    duplicates, write ``_rows/``, ``scores/`` and ``rejects/``, and remove ``_scored/``.

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
    duplicates = _find_duplicates(keys)
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
    if paths.fs.exists(paths.staged(SCORED_DIR)):
        paths.fs.rm(paths.staged(SCORED_DIR), recursive=True)
    return rows, duplicates.num_rows


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
        # The cache was not folded (a failed fold), and a retried batch or a duplicate row
        # stored a trace twice (with equal values): keep one.
        scores = scores.groupby("trace_id", num_partitions=partitions).map_groups(
            lambda group: group.slice(0, 1), batch_format="pyarrow"
        )
    joined = rows.join(scores, "left_outer", num_partitions=partitions, on=("trace_id",))
    return joined.map_batches(cast_to(SCORED_ROWS_SCHEMA), batch_format="pyarrow")


def _find_duplicates(keys: Any) -> pa.Table:
    """Rows repeating an earlier (prompt_id, teacher, response), with the reason.

    The first copy of each dup_key is the one with the smallest (source_file, row_number). Keys
    are sorted (so copies share a block but at blocks' edges); each block reports its keys held
    more than once and its edge keys, with their first copy and count (``_block_firsts``); the
    driver merges those, and a second pass marks every later copy (``_later_copies``). No Python
    runs per row or per key.

    Args:
        keys: Every row's dup_key, source_file and row_number (dup_key null: rejected).

    Returns:
        source_file, row_number and reason of each duplicate row.
    """
    valid = keys.map_batches(lambda t: t.filter(pc.is_valid(t["dup_key"])), batch_format="pyarrow")
    ordered = valid.sort("dup_key").materialize()
    partials = ordered.map_batches(_block_firsts, batch_format="pyarrow", batch_size=None)
    firsts = _merge_firsts(collect(partials, _FIRSTS))
    if firsts.num_rows == 0:
        return _DUPLICATES.empty_table()
    marks = ordered.map_batches(
        _later_copies, fn_kwargs={"firsts": firsts}, batch_format="pyarrow", batch_size=None
    )
    return collect(marks, _DUPLICATES)


_FIRSTS = pa.schema(
    [
        ("dup_key", pa.string()),
        ("first_file", pa.string()),
        ("first_row", pa.int64()),
        ("copies", pa.int64()),
    ]
)
_DUPLICATES = pa.schema(
    [("source_file", pa.string()), ("row_number", pa.int64()), ("reason", pa.string())]
)


def _firsts(frame: pl.DataFrame) -> pl.DataFrame:
    """Per key: its smallest (file, row) and the copies counted."""
    return (
        frame.sort(["dup_key", "first_file", "first_row"])
        .group_by("dup_key", maintain_order=True)
        .agg(pl.col("first_file").first(), pl.col("first_row").first(), pl.col("copies").sum())
    )


def _block_firsts(block: pa.Table) -> pa.Table:
    """A block's keys held more than once, and its first and last key (which may continue in
    the neighbouring blocks), each with its first copy and number of copies."""
    frame = pl.from_arrow(block.select(["dup_key", "source_file", "row_number"]))
    assert isinstance(frame, pl.DataFrame)
    frame = frame.rename({"source_file": "first_file", "row_number": "first_row"})
    firsts = _firsts(frame.with_columns(copies=pl.lit(1, pl.Int64)))
    if firsts.height == 0:
        return _FIRSTS.empty_table()
    edges = pl.col("dup_key").is_in([firsts["dup_key"][0], firsts["dup_key"][-1]])
    kept = firsts.filter((pl.col("copies") > 1) | edges)
    return kept.to_arrow().select(_FIRSTS.names).cast(_FIRSTS)


def _merge_firsts(partials: pa.Table) -> pa.Table:
    """Keys held more than once over all blocks, with their first copy."""
    frame = pl.from_arrow(partials)
    assert isinstance(frame, pl.DataFrame)
    merged = _firsts(frame).filter(pl.col("copies") > 1)
    return merged.to_arrow().select(_FIRSTS.names).cast(_FIRSTS)


def _later_copies(block: pa.Table, firsts: pa.Table) -> pa.Table:
    """The block's rows that repeat an earlier row of their key, with the reason."""
    where = pc.index_in(block["dup_key"], value_set=firsts["dup_key"])
    first_file = pc.take(firsts["first_file"], where)
    first_row = pc.take(firsts["first_row"], where)
    is_first = pc.and_(
        pc.equal(block["source_file"], first_file), pc.equal(block["row_number"], first_row)
    )
    later = pc.and_(pc.is_valid(where), pc.invert(pc.fill_null(is_first, False)))
    reason = pc.binary_join_element_wise(
        "duplicate of ", first_file, " row ", pc.cast(first_row, pa.string()), ""
    )
    table = pa.table(
        {"source_file": block["source_file"], "row_number": block["row_number"], "reason": reason}
    )
    return table.filter(pc.fill_null(later, False)).cast(_DUPLICATES)


def _finish_rows(table: pa.Table, duplicates: pa.Table) -> pa.Table:
    reasons = table["reject_reason"]
    if duplicates.num_rows:
        where = pc.index_in(row_keys(table), value_set=row_keys(duplicates))
        reasons = pc.coalesce(reasons, pc.take(duplicates["reason"], where))
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
