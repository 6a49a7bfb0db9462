"""The curated SFT set: each prompt's selected trace as chat ``messages``, extras carried along.

Input columns other than the canonical ones travel through the job as JSON (``extra``). Here they
become real columns again, with one type per column across every output file: the types seen in
all selected rows are collected first (``extra_types``) and unified (``extra_schema``). An input
column named like one of the curated set's own columns comes back with an ``input_`` prefix.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ln_ray.io import jsontext
from ln_ray.prepare.layout import as_sharegpt
from ln_ray.schema import CURATED_BASE, curated_base, row_keys

# The curated set's columns that come from the selected row itself (the rest is its text).
CURATED_KEYS = [name for name in CURATED_BASE.names if name != "messages"]
# The curated set's own column names, in either messages format: input columns named so are
# renamed (``curated_column``).
OWN_COLUMNS = {*CURATED_BASE.names, "conversations"}
_SCALARS = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}


def keep_selected(table: pa.Table, selected: pa.Array) -> pa.Table:
    """Accepted rows whose trace_id is among the ``selected`` ids.

    A rejected duplicate carries the trace_id of the row it repeats, so the id alone would let
    both copies into the curated set.
    """
    mask = pc.is_in(table["trace_id"], value_set=selected)
    return table.filter(pc.and_(pc.fill_null(mask, False), pc.is_null(table["reject_reason"])))


def with_text(texts: pa.Table, selected: pa.Table) -> pa.Table:
    """The rows of ``texts`` (source_file, row_number, messages, extra) that ``selected`` names,
    with the selected row's own columns (``CURATED_KEYS``) joined on."""
    where = pc.index_in(row_keys(texts), value_set=row_keys(selected))
    mine = pc.is_valid(where)
    texts, where = texts.filter(mine), pc.drop_null(where)
    columns = {name: pc.take(selected[name], where) for name in CURATED_KEYS}
    return pa.table({**columns, "messages": texts["messages"], "extra": texts["extra"]})


def curated_column(key: str) -> str:
    """An extra input column's name in the curated set.

    Its own name, unless that is one of the curated set's own columns, possibly behind ``input_``
    prefixes: those gain one more (``trace_id`` -> ``input_trace_id``, ``input_trace_id`` ->
    ``input_input_trace_id``), so no two input columns share a name and none is dropped.
    """
    core = key
    while core.startswith("input_"):
        core = core[len("input_") :]
    return f"input_{key}" if core in OWN_COLUMNS else key


def extra_types(table: pa.Table) -> pa.Table:
    """Distinct (curated column, Python type name) pairs among the rows' extra columns."""
    seen = set()
    for text in table["extra"].to_pylist():
        for key, value in (jsontext.loads(text) if text else {}).items():
            seen.add((curated_column(key), type(value).__name__))
    keys, kinds = zip(*sorted(seen)) if seen else ((), ())
    return pa.table({"column": pa.array(keys, pa.string()), "kind": pa.array(kinds, pa.string())})


def extra_schema(pairs: list[tuple[str, str]], reserved: set[str] | None = None) -> pa.Schema:
    """One Arrow type per extra column: its scalar type, float64 for int+float, else JSON text."""
    kinds: dict[str, set[str]] = {}
    for column, kind in pairs:
        kinds.setdefault(column, set()).add(kind)
    by_name = {t.__name__: arrow for t, arrow in _SCALARS.items()}
    fields = []
    for column in sorted(kinds):
        if reserved and column in reserved:
            continue
        found = kinds[column] - {"NoneType"}
        if len(found) == 1 and next(iter(found)) in by_name:
            arrow = by_name[next(iter(found))]
        elif found and found <= {"int", "float"}:
            arrow = pa.float64()
        else:
            arrow = pa.string()
        fields.append((column, arrow))
    return pa.schema(fields)


def curate_batch(table: pa.Table, *, schema: pa.Schema) -> pa.Table:
    """Turn selected rows into SFT records: base columns, the conversation (``messages``, or
    ShareGPT ``conversations`` when ``schema`` has them), then the extra columns."""
    sharegpt = "conversations" in schema.names and "messages" not in schema.names
    base = curated_base("sharegpt" if sharegpt else "openai").names
    extras = [f for f in schema if f.name not in base]
    out: dict[str, list[Any]] = {name: [] for name in schema.names}
    for row in table.select([*CURATED_BASE.names, "extra"]).to_pylist():
        for name in CURATED_KEYS:
            out[name].append(row[name])
        messages = jsontext.loads(row["messages"])
        if sharegpt:
            out["conversations"].append(as_sharegpt(messages))
        else:
            out["messages"].append(messages)
        values = {
            curated_column(key): value
            for key, value in (jsontext.loads(row["extra"]) if row["extra"] else {}).items()
        }
        for field in extras:
            value = values.get(field.name)
            if pa.types.is_string(field.type) and value is not None and not isinstance(value, str):
                value = jsontext.dumps(value)
            out[field.name].append(value)
    return pa.table(out, schema=schema)


def curated_schema(extra: pa.Schema, messages_format: str = "openai") -> pa.Schema:
    """The curated table's schema: the base columns (the conversation in ``messages_format``)
    followed by the extra columns."""
    base = curated_base(messages_format)
    return pa.schema([*base, *[f for f in extra if f.name not in base.names]])
