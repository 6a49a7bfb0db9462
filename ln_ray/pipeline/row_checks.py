"""The checks that need every row of a prompt at once, with no Python per row or key: later
copies of a (prompt_id, teacher, response) are duplicates, and a prompt_id that names different
prompts (another context before the response) rejects its rows.

Both take the rows of whole prompts: the assemble stage groups rows by a hash of prompt_id
(``ray_ops.grouped_by_hash``), and the copies of a row share its prompt_id, so every row a check
compares is in the same table. Ray-free.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ln_ray.schema import LATE_REJECTS_SCHEMA, ROW_KEY, SHARED_PROMPT_ID, row_keys, row_place


def duplicate_rows(rows: pa.Table) -> pa.Table:
    """Rows repeating an earlier (prompt_id, teacher, response), with the reason.

    The first copy of each dup_key is the one with the smallest row key (source_file,
    row_number, item).

    Args:
        rows: Rows of whole prompts, with dup_key (null: rejected) and their row key.

    Returns:
        The row key, reason and kind of each duplicate row (``LATE_REJECTS_SCHEMA``).
    """
    rows = rows.filter(pc.is_valid(rows["dup_key"]))
    frame = pl.from_arrow(rows.select(["dup_key", *ROW_KEY]))
    assert isinstance(frame, pl.DataFrame)
    frame = frame.rename(_AS_FIRST)
    found = _firsts(frame).filter(pl.col("copies") > 1)
    if found.height == 0:
        return LATE_REJECTS_SCHEMA.empty_table()
    return _later_copies(rows, found.to_arrow().select(_FIRSTS.names).cast(_FIRSTS))


_FIRSTS = pa.schema(
    [
        ("dup_key", pa.string()),
        ("first_file", pa.string()),
        ("first_row", pa.int64()),
        ("first_item", pa.int32()),
        ("copies", pa.int64()),
    ]
)
_LATER = pa.schema(
    [
        *(LATE_REJECTS_SCHEMA.field(name) for name in ROW_KEY),
        ("first_file", pa.string()),
        ("first_row", pa.int64()),
        ("first_item", pa.int32()),
    ]
)
_AS_FIRST = {"source_file": "first_file", "row_number": "first_row", "item": "first_item"}
_FIRST = list(_AS_FIRST.values())


def _firsts(frame: pl.DataFrame) -> pl.DataFrame:
    """Per key: its smallest row key and the copies counted."""
    return (
        frame.sort(["dup_key", *_FIRST], nulls_last=False)
        .group_by("dup_key", maintain_order=True)
        .agg(*(pl.col(name).first() for name in _FIRST), pl.len().alias("copies"))
    )


def _repeats(block: pa.Table, found: pa.Table) -> pa.Table:
    """The block's rows that repeat an earlier row of their key (``found``: the keys held more
    than once, with their first copy), with their first copy."""
    where = pc.index_in(block["dup_key"], value_set=found["dup_key"])
    first = {name: pc.take(found[name], where) for name in _FIRST}
    table = pa.table({**{name: block[name] for name in ROW_KEY}, **first})
    is_first = pc.equal(
        row_keys(table), row_keys(table.select(_FIRST).rename_columns(list(ROW_KEY)))
    )
    later = pc.and_(pc.is_valid(where), pc.invert(pc.fill_null(is_first, False)))
    return table.filter(pc.fill_null(later, False)).cast(_LATER)


def _later_copies(block: pa.Table, found: pa.Table) -> pa.Table:
    """The block's rows that repeat an earlier row of their key, with the reason."""
    later = _repeats(block, found)
    first = row_place(later["first_file"], later["first_row"], later["first_item"])
    reason = pc.binary_join_element_wise("duplicate of ", first, "")
    table = pa.table(
        {
            **{name: later[name] for name in ROW_KEY},
            "reason": reason,
            "kind": pa.array(["duplicate"] * later.num_rows, pa.string()),
        }
    )
    return table.cast(LATE_REJECTS_SCHEMA)


def conflicting_rows(rows: pa.Table) -> pa.Table:
    """Accepted rows whose prompt_id also names another prompt (another context before the
    response), with a reason naming the first row of two of them.

    Args:
        rows: Rows of whole prompts, with prompt_id, context_key (null: rejected) and their
            row key.

    Returns:
        The row key, reason and kind of each rejected row (``LATE_REJECTS_SCHEMA``).
    """
    rows = rows.filter(pc.is_valid(rows["context_key"]))
    frame = pl.from_arrow(rows.select(["prompt_id", "context_key", *ROW_KEY]))
    assert isinstance(frame, pl.DataFrame)
    found = _conflicts(frame.rename(_AS_FIRST))
    if found.num_rows == 0:
        return LATE_REJECTS_SCHEMA.empty_table()
    return _conflicting_rows(rows, found)


_CONFLICTS = pa.schema([("prompt_id", pa.string()), ("reason", pa.string())])


def _first_of_each_context(frame: pl.DataFrame) -> pl.DataFrame:
    """Per (prompt_id, context): its first row, in row key order."""
    return (
        frame.sort(["prompt_id", "context_key", *_FIRST], nulls_last=False)
        .group_by(["prompt_id", "context_key"], maintain_order=True)
        .agg(*(pl.col(name).first() for name in _FIRST))
    )


def _conflicts(frame: pl.DataFrame) -> pa.Table:
    """Prompt ids with more than one context, with the reason their rows get."""
    firsts = _first_of_each_context(frame).sort(["prompt_id", *_FIRST], nulls_last=False)
    where = pl.format("{} row {}", pl.col("first_file"), pl.col("first_row"))
    item = pl.format("{} item {}", where, pl.col("first_item"))
    where = pl.when(pl.col("first_item").is_null()).then(where).otherwise(item)
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
            **{name: block[name] for name in ROW_KEY},
            "reason": pc.take(found["reason"], where),
            "kind": pa.array(["input"] * block.num_rows, pa.string()),
        }
    )
    return table.filter(pc.is_valid(where)).cast(LATE_REJECTS_SCHEMA)
