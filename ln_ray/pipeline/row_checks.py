"""The checks that group every accepted row by a key, with no Python per row or key: later
copies of a (prompt_id, teacher, response) are duplicates, and a prompt_id that names different
prompts (another context before the response) rejects its rows.

Both run as the same two passes over Ray Data (``_reject_across_blocks``): the rows are sorted
by key, each block reports what the driver needs of it (a few rows per key that matters, and its
edge keys), the driver merges the reports, and a second pass marks the rows to reject.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ln_ray.pipeline.ray_ops import collect
from ln_ray.schema import LATE_REJECTS_SCHEMA, SHARED_PROMPT_ID


def find_duplicates(keys: Any) -> pa.Table:
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
    marked: pa.Schema = LATE_REJECTS_SCHEMA,
) -> pa.Table:
    """The two passes of a check that groups rows by ``key``, with no Python per row or key.

    Rows (those with ``valid`` set) are sorted by ``key``, so a key's rows share a block but at
    blocks' edges; ``summarize`` reports, per block, what the driver needs of it (a few rows per
    key that matters, and the edge keys); ``merge`` joins the blocks' reports into the keys
    found; a second pass, ``mark(block, found=...)``, hands back the rows to reject.

    Returns:
        The rows ``mark`` hands back, in ``marked`` (default: source_file, row_number, reason
        and kind of each rejected row).
    """
    kept = rows.map_batches(lambda t: t.filter(pc.is_valid(t[valid])), batch_format="pyarrow")
    ordered = kept.sort(key).materialize()
    partials = ordered.map_batches(summarize, batch_format="pyarrow", batch_size=None)
    found = merge(collect(partials, summary_schema))
    if found.num_rows == 0:
        return marked.empty_table()
    marks = ordered.map_batches(
        mark, fn_kwargs={"found": found}, batch_format="pyarrow", batch_size=None
    )
    return collect(marks, marked)


_FIRSTS = pa.schema(
    [
        ("dup_key", pa.string()),
        ("first_file", pa.string()),
        ("first_row", pa.int64()),
        ("copies", pa.int64()),
    ]
)
_DUPLICATES = LATE_REJECTS_SCHEMA
_LATER = pa.schema(
    [
        ("source_file", pa.string()),
        ("row_number", pa.int64()),
        ("first_file", pa.string()),
        ("first_row", pa.int64()),
    ]
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


def _repeats(block: pa.Table, found: pa.Table) -> pa.Table:
    """The block's rows that repeat an earlier row of their key (``found``: the keys held more
    than once, with their first copy), with their first copy."""
    where = pc.index_in(block["dup_key"], value_set=found["dup_key"])
    first_file = pc.take(found["first_file"], where)
    first_row = pc.take(found["first_row"], where)
    is_first = pc.and_(
        pc.equal(block["source_file"], first_file), pc.equal(block["row_number"], first_row)
    )
    later = pc.and_(pc.is_valid(where), pc.invert(pc.fill_null(is_first, False)))
    table = pa.table(
        {
            "source_file": block["source_file"],
            "row_number": block["row_number"],
            "first_file": first_file,
            "first_row": first_row,
        }
    )
    return table.filter(pc.fill_null(later, False)).cast(_LATER)


def _later_copies(block: pa.Table, found: pa.Table) -> pa.Table:
    """The block's rows that repeat an earlier row of their key, with the reason."""
    later = _repeats(block, found)
    reason = pc.binary_join_element_wise(
        "duplicate of ", later["first_file"], " row ", pc.cast(later["first_row"], pa.string()), ""
    )
    table = pa.table(
        {
            "source_file": later["source_file"],
            "row_number": later["row_number"],
            "reason": reason,
            "kind": pa.array(["duplicate"] * later.num_rows, pa.string()),
        }
    )
    return table.cast(_DUPLICATES)


def find_conflicts(rows: Any) -> pa.Table:
    """Accepted rows whose prompt_id also names another prompt (another context before the
    response), with a reason naming the first row of two of them.

    As ``find_duplicates``: prompt ids are sorted; each block reports, per prompt id that has
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
