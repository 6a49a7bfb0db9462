"""The curated SFT set of a run: each prompt's trace selected by LALP, with its text.

The selected traces' rows are found by a grouping on trace_id, where the selections and the
rows' keys meet; each row then goes to a group per file of the text output (``_valid/``) that
may hold it, found from a table of which source files each file holds (a row per pair of
files, not per row), and each group reads its own files' text for its rows alone. Nothing that
grows with rows or prompts reaches the driver or is sent to every task.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ln_ray.aggregate.curate import (
    CURATED_KEYS,
    curate_batch,
    curated_schema,
    extra_schema,
    extra_types,
    keep_selected,
    with_text,
)
from ln_ray.io.manifest import ROWS_DIR
from ln_ray.io.run_folder import RunFolder
from ln_ray.pipeline.ray_ops import collect, grouped_by_hash, write_dataset
from ln_ray.schema import (
    ROW_KEY,
    SCORED_ROWS_SCHEMA,
    TEXT_COLUMNS,
    VALIDATED_SCHEMA,
    padded,
    row_keys,
)

# What the curated set needs of each selected row, besides its text.
_SELECTED_ROWS = pa.schema([SCORED_ROWS_SCHEMA.field(name) for name in (*ROW_KEY, *CURATED_KEYS)])
# What the curated set reads of _rows/ to find them (not the scores).
_ROW_KEYS = pa.schema(
    [SCORED_ROWS_SCHEMA.field(name) for name in (*_SELECTED_ROWS.names, "reject_reason")]
)
# Both sides of the grouping on trace_id that finds them: rows, and the selected ids (picked).
_PICKABLE = pa.schema([*_ROW_KEYS, ("picked", pa.bool_())])


class Tables(Protocol):
    """Where a run's outputs lie: a ``RunFolder`` or a ``PublishedRun``."""

    arrow_fs: Any

    def full(self, name: str) -> str: ...


def write_curated(
    source: Tables,
    text: str,
    target: RunFolder,
    selections: Any,
    partitions: int,
    messages_format: str = "openai",
    curate_by: str = "lalp",
) -> None:
    """Write ``curated/``: each prompt's trace selected by ``curate_by`` (LALP by default) with
    its text, the conversation in ``messages_format`` (``schema.curated_base``).

    The selected traces' rows are found by a grouping on trace_id (the selections and the rows'
    keys meet in the same group); each row then goes to a group per file of ``text`` that may
    hold it (from a table of which source files each file holds: a row per file, not per row),
    and each group reads its own file's text for its rows alone.
    """
    import ray

    arrow_fs = source.arrow_fs
    rows = ray.data.read_parquet(
        source.full(ROWS_DIR), filesystem=arrow_fs, columns=_ROW_KEYS.names, schema=_ROW_KEYS
    ).map_batches(_as_pickable, batch_format="pyarrow")
    picked = selections.map_batches(_picks, fn_kwargs={"metric": curate_by}, batch_format="pyarrow")
    selected = grouped_by_hash(rows.union(picked), "trace_id", _picked_rows, partitions)
    holders = _files_holding(source, text)
    # The rows to read, by file (keys only, a row per selected trace): the text itself is read
    # twice, streaming, never held. A curated set of 10 KB rows is 2.5 GB at 250,000 prompts.
    routed = selected.map_batches(
        _to_files, fn_kwargs={"holders": holders}, batch_format="pyarrow"
    ).materialize()
    where = {"folder": source.full(text), "arrow_fs": arrow_fs}
    kinds = collect(
        grouped_by_hash(routed, "text_file", _extra_types_of, partitions, **where), _KINDS
    ).to_pylist()
    subset = grouped_by_hash(routed, "text_file", _text_of, partitions, **where)
    schema = curated_schema(
        extra_schema([(k["column"], k["kind"]) for k in kinds]), messages_format
    )
    write_dataset(
        subset.map_batches(curate_batch, fn_kwargs={"schema": schema}, batch_format="pyarrow"),
        target,
        "curated",
    )
    target.ensure_table("curated", schema)


def _as_pickable(rows: pa.Table) -> pa.Table:
    """Rows' keys (``_ROW_KEYS``) on the rows' side of the grouping on trace_id."""
    return padded(rows.append_column("picked", pa.repeat(False, rows.num_rows)), _PICKABLE)


def _picks(selections: pa.Table, metric: str) -> pa.Table:
    """The traces ``metric`` selected, on the selections' side of the grouping on trace_id."""
    ids = selections.filter(pc.equal(selections["metric"], metric))["trace_id"]
    return padded(pa.table({"trace_id": ids, "picked": pa.repeat(True, len(ids))}), _PICKABLE)


def _picked_rows(group: pa.Table) -> pa.Table:
    """The accepted rows of a group holding a selected trace."""
    picked = group["picked"]
    ids = group.filter(picked)["trace_id"]
    rows = keep_selected(group.filter(pc.invert(picked)), ids.combine_chunks())
    return rows.select(_SELECTED_ROWS.names).cast(_SELECTED_ROWS)


def _files_holding(source: Tables, text: str) -> pa.Table:
    """Which files of ``text`` hold rows of which source file (``source_file``, ``text_file``):
    a row per pair, whatever the rows."""
    import ray

    pairs = ray.data.read_parquet(
        source.full(text), filesystem=source.arrow_fs, columns=["source_file"], include_paths=True
    ).map_batches(_file_pairs, batch_format="pyarrow")
    return collect(pairs, _HOLDERS).group_by(_HOLDERS.names, use_threads=False).aggregate([])


_HOLDERS = pa.schema([("source_file", pa.string()), ("text_file", pa.string())])


def _file_pairs(rows: pa.Table) -> pa.Table:
    names = pa.array([posixpath.basename(p) for p in rows["path"].to_pylist()], pa.string())
    pairs = pa.table({"source_file": rows["source_file"], "text_file": names}, schema=_HOLDERS)
    return pairs.group_by(_HOLDERS.names, use_threads=False).aggregate([])


def _to_files(selected: pa.Table, holders: pa.Table) -> pa.Table:
    """Each selected row once per file of the text that may hold it (``text_file``)."""
    return selected.join(holders, "source_file", join_type="inner", use_threads=False)


def _text_of(group: pa.Table, folder: str, arrow_fs: Any) -> pa.Table:
    """The selected rows of a group with their text, each file of it read once."""
    found = [
        with_text(texts, mine)
        for texts, mine in _files_of(group, folder, arrow_fs, [*ROW_KEY, *TEXT_COLUMNS])
    ]
    return pa.concat_tables(found)


_KINDS = pa.schema([("column", pa.string()), ("kind", pa.string())])


def _extra_types_of(group: pa.Table, folder: str, arrow_fs: Any) -> pa.Table:
    """The (column, type) pairs among the extra columns of a group's selected rows, reading
    only their ``extra``."""
    found = [
        extra_types(texts.filter(pc.is_in(row_keys(texts), value_set=row_keys(mine))))
        for texts, mine in _files_of(group, folder, arrow_fs, [*ROW_KEY, "extra"])
    ]
    return pa.concat_tables([_KINDS.empty_table(), *found]).group_by(_KINDS.names).aggregate([])


def _files_of(
    group: pa.Table, folder: str, arrow_fs: Any, columns: list[str]
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Per file of ``folder`` the group names: its ``columns``, and the group's rows there."""
    for name in pc.unique(group["text_file"]).to_pylist():
        # By schema: a run folder written before rows had an ``item`` reads it as null.
        schema = pa.schema([VALIDATED_SCHEMA.field(column) for column in columns])
        texts = pq.read_table(f"{folder}/{name}", filesystem=arrow_fs, schema=schema)
        mine = group.filter(pc.equal(group["text_file"], name))
        yield texts, mine.select(_SELECTED_ROWS.names)
