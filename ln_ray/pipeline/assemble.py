"""Assemble every input row with its scores: the run's ``_rows/``, ``scores/`` and ``rejects/``.

Only narrow columns travel here (provenance, ids, scores); the rows' text stays in ``_valid/``.

Every accepted row of ``_valid/`` is joined with the score cache (this run's scores were folded
into it); rows rejected at validation pass as they are, and rows the scoring pass rejected take
its reason. Then rows whose prompt_id names different prompts are rejected (a selection across
them would compare answers to different questions), and later copies of a (prompt_id, teacher,
response) are marked duplicates.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ln_ray.io import cache, storage
from ln_ray.pipeline import outputs
from ln_ray.pipeline.outputs import ROWS_DIR, RunPaths, write_dataset
from ln_ray.pipeline.passes import read_valid, rejects_of
from ln_ray.pipeline.reduce import cast_to, collect, reduce_partitions
from ln_ray.schema import (
    CACHE_SCHEMA,
    LATE_REJECTS_SCHEMA,
    REJECTS_SCHEMA,
    ROW_META_SCHEMA,
    SCORED_ROWS_SCHEMA,
    SCORES_SCHEMA,
    SHARED_PROMPT_ID,
    row_keys,
)


def assemble_rows(
    paths: RunPaths, cache_url: str, late_rejects: pa.Table, buckets: int | None
) -> tuple[Any, int]:
    """Complete every row with its scores (not its text, which stays in ``_valid/``), mark
    duplicates, and write ``_rows/``, ``scores/`` and ``rejects/``.

    ``_valid/`` is read once, without its text, in a few large blocks (one shard per block would
    make every shuffle below cost the square of the number of input files). Every accepted row
    takes its scores from the cache, where this run's scoring put them too.

    Args:
        paths: The run's paths.
        cache_url: The score cache.
        late_rejects: Rows the scoring pass rejected (``LATE_REJECTS_SCHEMA``).
        buckets: The cache's bucket count when every file of it is a bucket (it was folded);
            None when it may hold parts, and a trace twice.

    Returns:
        The finished rows (materialized) and the number of duplicate rows rejected.
    """
    partitions = reduce_partitions()
    meta = read_valid(paths, columns=ROW_META_SCHEMA.names, blocks=partitions).materialize()
    rows = meta.map_batches(_rejected, batch_format="pyarrow")
    accepted = meta.map_batches(_accepted, batch_format="pyarrow")
    rows = rows.union(_join_cache(accepted, cache_url, buckets, partitions))
    conflicts = _find_conflicts(
        meta.select_columns(["prompt_id", "context_key", "source_file", "row_number"])
    )
    duplicates = _find_duplicates(meta.select_columns(["dup_key", "source_file", "row_number"]))
    late = pa.concat_tables([late_rejects.cast(LATE_REJECTS_SCHEMA), conflicts, duplicates])
    rows = rows.map_batches(_finish_rows, fn_kwargs={"late": late}, batch_format="pyarrow")
    rows = rows.materialize()
    # A few large blocks (about two per CPU): each is written as one file by the task that
    # makes it.
    write_dataset(rows, paths.staged(ROWS_DIR), paths.arrow_fs, task_args={})
    scores = rows.map_batches(_scores_part, batch_format="pyarrow")
    write_dataset(scores, paths.staged("scores"), paths.arrow_fs, task_args={})
    rejects = rows.map_batches(rejects_of, batch_format="pyarrow")
    write_dataset(rejects, paths.staged("rejects"), paths.arrow_fs, task_args={})
    for name, schema in (
        (ROWS_DIR, SCORED_ROWS_SCHEMA),
        ("scores", SCORES_SCHEMA),
        ("rejects", REJECTS_SCHEMA),
    ):
        outputs.ensure_table(paths.fs, paths.staged(name), schema)
    return rows, duplicates.num_rows


def is_unscored(table: pa.Table) -> pa.Array:
    """Accepted rows without scores (their trace was neither scored nor found in the cache)."""
    return pc.and_(pc.is_null(table["reject_reason"]), pc.is_null(table["n_tokens"]))


def _accepted(table: pa.Table) -> pa.Table:
    """Validated rows to complete from the cache."""
    return table.filter(pc.is_null(table["reject_reason"]))


def _rejected(table: pa.Table) -> pa.Table:
    """Rows rejected at validation, in ``SCORED_ROWS_SCHEMA`` (no scores)."""
    return _without_scores(table.filter(pc.is_valid(table["reject_reason"])))


def _without_scores(rows: pa.Table) -> pa.Table:
    """Rows of ``ROW_META_SCHEMA`` in ``SCORED_ROWS_SCHEMA``, their scores null."""
    rejected = rows
    for field in SCORED_ROWS_SCHEMA:
        if field.name not in rejected.column_names:
            rejected = rejected.append_column(field, pa.nulls(rejected.num_rows, field.type))
    return rejected.select(SCORED_ROWS_SCHEMA.names).cast(SCORED_ROWS_SCHEMA)


def _join_cache(rows: Any, cache_url: str, buckets: int | None, partitions: int) -> Any:
    """Rows (``ROW_META_SCHEMA``) with their scores from the cache, in ``SCORED_ROWS_SCHEMA``.

    A folded cache is joined bucket by bucket: the rows (narrow) are grouped by their trace's
    bucket, and each group reads its bucket's file alone, so the scores never go through a
    shuffle. A cache with parts goes through Ray Data's join, one copy of each trace kept.
    """
    import ray

    files = cache.cache_files(cache_url)
    if not files:  # nothing scored yet: every accepted row must be a late reject
        return rows.map_batches(_without_scores, batch_format="pyarrow")
    if buckets is not None:
        return (
            rows.map_batches(
                cache.with_bucket, fn_kwargs={"buckets": buckets}, batch_format="pyarrow"
            )
            .groupby("bucket", num_partitions=partitions)
            .map_groups(
                _join_bucket,
                fn_kwargs={"cache_url": cache_url, "buckets": buckets},
                batch_format="pyarrow",
            )
        )
    cache_fs, _ = storage.filesystem(cache_url)
    scores = ray.data.read_parquet(
        files, filesystem=storage.arrow_filesystem(cache_fs), schema=CACHE_SCHEMA
    )
    # A retried batch or a duplicate row may have stored a trace twice (with equal values).
    scores = scores.groupby("trace_id", num_partitions=partitions).map_groups(
        lambda group: group.slice(0, 1), batch_format="pyarrow"
    )
    joined = rows.join(scores, "left_outer", num_partitions=partitions, on=("trace_id",))
    return joined.map_batches(cast_to(SCORED_ROWS_SCHEMA), batch_format="pyarrow")


def _join_bucket(group: pa.Table, cache_url: str, buckets: int) -> pa.Table:
    """Rows of one cache bucket with their scores from its file (null where it has none)."""
    stored = cache.read_bucket(cache_url, group["bucket"][0].as_py(), buckets)
    found = stored.take(pc.index_in(group["trace_id"], value_set=stored["trace_id"]))
    columns = {name: group[name] for name in ROW_META_SCHEMA.names}
    columns.update({name: found[name] for name in CACHE_SCHEMA.names if name != "trace_id"})
    return pa.table(columns).select(SCORED_ROWS_SCHEMA.names).cast(SCORED_ROWS_SCHEMA)


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
    return _reject_across_blocks(
        keys, "dup_key", "dup_key", _block_firsts, _FIRSTS, _merge_firsts, _later_copies
    )


def _reject_across_blocks(
    rows: Any,
    valid: str,
    key: str,
    summarize: Any,
    summary_schema: pa.Schema,
    merge: Any,
    mark: Any,
) -> pa.Table:
    """The two passes of a check that groups rows by ``key``, with no Python per row or key.

    Rows (those with ``valid`` set) are sorted by ``key``, so a key's rows share a block but at
    blocks' edges; ``summarize`` reports, per block, what the driver needs of it (a few rows per
    key that matters, and the edge keys); ``merge`` joins the blocks' reports into the keys
    found; a second pass, ``mark(block, found=...)``, hands back the rows to reject.

    Returns:
        source_file, row_number, reason and kind of each rejected row.
    """
    kept = rows.map_batches(lambda t: t.filter(pc.is_valid(t[valid])), batch_format="pyarrow")
    ordered = kept.sort(key).materialize()
    partials = ordered.map_batches(summarize, batch_format="pyarrow", batch_size=None)
    found = merge(collect(partials, summary_schema))
    if found.num_rows == 0:
        return _DUPLICATES.empty_table()
    marks = ordered.map_batches(
        mark, fn_kwargs={"found": found}, batch_format="pyarrow", batch_size=None
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
_DUPLICATES = LATE_REJECTS_SCHEMA


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


def _later_copies(block: pa.Table, found: pa.Table) -> pa.Table:
    """The block's rows that repeat an earlier row of their key (``found``: the keys held more
    than once, with their first copy), with the reason."""
    where = pc.index_in(block["dup_key"], value_set=found["dup_key"])
    first_file = pc.take(found["first_file"], where)
    first_row = pc.take(found["first_row"], where)
    is_first = pc.and_(
        pc.equal(block["source_file"], first_file), pc.equal(block["row_number"], first_row)
    )
    later = pc.and_(pc.is_valid(where), pc.invert(pc.fill_null(is_first, False)))
    reason = pc.binary_join_element_wise(
        "duplicate of ", first_file, " row ", pc.cast(first_row, pa.string()), ""
    )
    table = pa.table(
        {
            "source_file": block["source_file"],
            "row_number": block["row_number"],
            "reason": reason,
            "kind": pa.array(["duplicate"] * block.num_rows, pa.string()),
        }
    )
    return table.filter(pc.fill_null(later, False)).cast(_DUPLICATES)


def _find_conflicts(rows: Any) -> pa.Table:
    """Accepted rows whose prompt_id also names another prompt (another context before the
    response), with a reason naming the first row of two of them.

    As ``_find_duplicates``: prompt ids are sorted; each block reports, per prompt id that has
    more than one context in it or sits at its edge, the first row of each context; the driver
    merges those (a few rows per conflicting prompt id) and a second pass marks the rows.

    Args:
        rows: Every row's prompt_id, context_key, source_file and row_number (context_key
            null: rejected).

    Returns:
        source_file, row_number, reason and kind of each rejected row.
    """
    return _reject_across_blocks(
        rows,
        "context_key",
        "prompt_id",
        _block_contexts,
        _CONTEXTS,
        _merge_contexts,
        _conflicting_rows,
    )


_CONTEXTS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("context_key", pa.string()),
        ("first_file", pa.string()),
        ("first_row", pa.int64()),
    ]
)
_CONFLICTS = pa.schema([("prompt_id", pa.string()), ("reason", pa.string())])


def _first_of_each_context(frame: pl.DataFrame) -> pl.DataFrame:
    """Per (prompt_id, context): its first row, in (file, row) order."""
    return (
        frame.sort(["prompt_id", "context_key", "first_file", "first_row"])
        .group_by(["prompt_id", "context_key"], maintain_order=True)
        .agg(pl.col("first_file").first(), pl.col("first_row").first())
    )


def _block_contexts(block: pa.Table) -> pa.Table:
    """A block's prompt ids with more than one context, and its first and last prompt id
    (which may continue in the neighbouring blocks), with the first row of each context."""
    frame = pl.from_arrow(block.select(["prompt_id", "context_key", "source_file", "row_number"]))
    assert isinstance(frame, pl.DataFrame)
    frame = frame.rename({"source_file": "first_file", "row_number": "first_row"})
    firsts = _first_of_each_context(frame)
    if firsts.height == 0:
        return _CONTEXTS.empty_table()
    per_prompt = pl.col("context_key").count().over("prompt_id")
    edges = pl.col("prompt_id").is_in([firsts["prompt_id"][0], firsts["prompt_id"][-1]])
    kept = firsts.filter((per_prompt > 1) | edges)
    return kept.to_arrow().select(_CONTEXTS.names).cast(_CONTEXTS)


def _merge_contexts(partials: pa.Table) -> pa.Table:
    """Prompt ids with more than one context over all blocks, with the reason their rows get."""
    frame = pl.from_arrow(partials)
    assert isinstance(frame, pl.DataFrame)
    firsts = _first_of_each_context(frame).sort(["prompt_id", "first_file", "first_row"])
    where = pl.format("{} row {}", pl.col("first_file"), pl.col("first_row"))
    merged = (
        firsts.with_columns(where=where)
        .group_by("prompt_id", maintain_order=True)
        .agg(pl.col("where"), pl.len().alias("contexts"))
        .filter(pl.col("contexts") > 1)
    )
    reasons = [
        f"{SHARED_PROMPT_ID}: {prompt_id!r} in {places[0]} and {places[1]}"
        + (f" ({contexts} prompts in all)" if contexts > 2 else "")
        for prompt_id, places, contexts in merged.iter_rows()
    ]
    return pa.table(
        {"prompt_id": merged["prompt_id"].to_arrow(), "reason": pa.array(reasons, pa.string())},
        schema=_CONFLICTS,
    )


def _conflicting_rows(block: pa.Table, found: pa.Table) -> pa.Table:
    """The block's rows whose prompt_id names different prompts (``found``: those prompt ids,
    with the reason), with the reason."""
    where = pc.index_in(block["prompt_id"], value_set=found["prompt_id"])
    table = pa.table(
        {
            "source_file": block["source_file"],
            "row_number": block["row_number"],
            "reason": pc.take(found["reason"], where),
            "kind": pa.array(["input"] * block.num_rows, pa.string()),
        }
    )
    return table.filter(pc.is_valid(where)).cast(_DUPLICATES)


def _finish_rows(table: pa.Table, late: pa.Table) -> pa.Table:
    reasons, kinds = table["reject_reason"], table["reject_kind"]
    if late.num_rows:
        where = pc.index_in(row_keys(table), value_set=row_keys(late))
        late_reason = pc.take(late["reason"], where)
        kinds = pc.if_else(pc.is_valid(reasons), kinds, pc.take(late["kind"], where))
        reasons = pc.coalesce(reasons, late_reason)
    reasons = storage.redact_urls_arrow(reasons)  # a shard's read error may quote its URL
    return (
        table.set_column(table.schema.get_field_index("reject_reason"), "reject_reason", reasons)
        .set_column(table.schema.get_field_index("reject_kind"), "reject_kind", kinds)
        .select(SCORED_ROWS_SCHEMA.names)
        .cast(SCORED_ROWS_SCHEMA)
    )


def _scores_part(table: pa.Table) -> pa.Table:
    return cast_to(SCORES_SCHEMA)(table.filter(pc.is_null(table["reject_reason"])))
