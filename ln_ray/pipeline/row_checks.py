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

from ln_ray.schema import LATE_REJECTS_SCHEMA, SHARED_PROMPT_ID


def duplicate_rows(rows: pa.Table) -> pa.Table:
    """Rows repeating an earlier (prompt_id, teacher, response), with the reason.

    The first copy of each dup_key is the one with the smallest (source_file, row_number).

    Args:
        rows: Rows of whole prompts, with dup_key (null: rejected), source_file and row_number.

    Returns:
        source_file, row_number, reason and kind of each duplicate row
        (``LATE_REJECTS_SCHEMA``).
    """
    rows = rows.filter(pc.is_valid(rows["dup_key"]))
    frame = pl.from_arrow(rows.select(["dup_key", "source_file", "row_number"]))
    assert isinstance(frame, pl.DataFrame)
    frame = frame.rename({"source_file": "first_file", "row_number": "first_row"})
    found = _firsts(frame).filter(pl.col("copies") > 1)
    if found.height == 0:
        return LATE_REJECTS_SCHEMA.empty_table()
    return _later_copies(rows, found.to_arrow().select(_FIRSTS.names).cast(_FIRSTS))


_FIRSTS = pa.schema(
    [
        ("dup_key", pa.string()),
        ("first_file", pa.string()),
        ("first_row", pa.int64()),
        ("copies", pa.int64()),
    ]
)
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
        .agg(pl.col("first_file").first(), pl.col("first_row").first(), pl.len().alias("copies"))
    )


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
    return table.cast(LATE_REJECTS_SCHEMA)


def conflicting_rows(rows: pa.Table) -> pa.Table:
    """Accepted rows whose prompt_id also names another prompt (another context before the
    response), with a reason naming the first row of two of them.

    Args:
        rows: Rows of whole prompts, with prompt_id, context_key (null: rejected), source_file
            and row_number.

    Returns:
        source_file, row_number, reason and kind of each rejected row (``LATE_REJECTS_SCHEMA``).
    """
    rows = rows.filter(pc.is_valid(rows["context_key"]))
    frame = pl.from_arrow(rows.select(["prompt_id", "context_key", "source_file", "row_number"]))
    assert isinstance(frame, pl.DataFrame)
    found = _conflicts(frame.rename({"source_file": "first_file", "row_number": "first_row"}))
    if found.num_rows == 0:
        return LATE_REJECTS_SCHEMA.empty_table()
    return _conflicting_rows(rows, found)


_CONFLICTS = pa.schema([("prompt_id", pa.string()), ("reason", pa.string())])


def _first_of_each_context(frame: pl.DataFrame) -> pl.DataFrame:
    """Per (prompt_id, context): its first row, in (file, row) order."""
    return (
        frame.sort(["prompt_id", "context_key", "first_file", "first_row"])
        .group_by(["prompt_id", "context_key"], maintain_order=True)
        .agg(pl.col("first_file").first(), pl.col("first_row").first())
    )


def _conflicts(frame: pl.DataFrame) -> pa.Table:
    """Prompt ids with more than one context, with the reason their rows get."""
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
    return table.filter(pc.is_valid(where)).cast(LATE_REJECTS_SCHEMA)
