"""The run's accounting: per input file, rows read = rows scored + rows rejected, and tokens.

Every row of every input file is accounted for: the files' rows are counted independently of
the pipeline (Parquet metadata, non-blank JSONL lines) and compared with what came out. A row of
a ``per_prompt`` input holds several traces: its counts are of traces (``rows_read`` and the
rest), and ``input_rows`` counts the file's rows, one per row key without an item or with item 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ln_ray.io.shards import count_source_rows
from ln_ray.io.storage import Inputs
from ln_ray.pipeline.assemble import is_unscored
from ln_ray.pipeline.ray_ops import cluster_cpus, reduce_partitions
from ln_ray.schema import ROW_KEY, SCORED_ROWS_SCHEMA, padded, reason_kinds, row_keys

COUNTS = ("rows_read", "rows_scored", "rows_rejected", "tokens_scored", "model_tokens")
PER_FILE = (*COUNTS[1:], "input_rows", "shard_errors", "tokens_scored_now", "model_tokens_now")
_COUNTERS = (*PER_FILE, "unscored")  # per block, by (file, reject reason, reject kind)


class AccountingError(RuntimeError):
    """Rows went missing, an accepted row has no scores, or the independent count failed."""


class RejectBudgetError(RuntimeError):
    """More rows were rejected than ``output.max_reject_fraction`` allows."""


@dataclass(frozen=True)
class RowCounts:
    """The run's accounting: per input file, and over all files.

    Attributes:
        per_file: Per ``source_file``, the manifest's row and token counters (``PER_FILE``).
        reasons: Rejected rows per reason (its text up to the first colon).
        kinds: Rejected rows per kind (``schema.REJECT_KINDS``).
    """

    per_file: dict[str, dict[str, int]]
    reasons: dict[str, int]
    kinds: dict[str, int]


def start_counting(inputs: Inputs) -> list[Any]:
    """Count the rows of every input file in the background, apart from the pipeline.

    A few tasks each count a contiguous slice of the files (about one task per two CPUs of the
    cluster): one task per file would start a worker process for every concurrent count.

    Args:
        inputs: The input files.

    Returns:
        Object refs; ``counted`` turns them into one ``count_source_rows`` result per file.
    """
    import ray

    sources = [(inputs.url(path), fmt) for path, fmt in inputs.files]
    tasks = max(1, min(len(sources), cluster_cpus() // 2))
    per_task = -(-len(sources) // tasks) if sources else 1
    count = ray.remote(num_cpus=0.1)(_count_files)
    return [count.remote(sources[i : i + per_task]) for i in range(0, len(sources), per_task)]


def counted(refs: list[Any]) -> list[dict[str, Any]]:
    """The per-file row counts of ``start_counting``, in the order of its files.

    Raises:
        AccountingError: A counting task failed: without the count, nothing proves that no row
            went missing, so the run does not publish.
    """
    import ray

    try:
        return [entry for chunk in ray.get(refs) for entry in chunk]
    except Exception as exc:
        detail = " ".join(str(exc).split())[:500]
        raise AccountingError(
            f"the independent count of the input files' rows failed, so nothing proves that "
            f"no row went missing: {type(exc).__name__}: {detail}"
        ) from None


def _count_files(sources: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [count_source_rows(url, fmt) for url, fmt in sources]


def count_rows(rows: Any, new_keys: Any | None) -> RowCounts:
    """Per input file, the manifest's row and token counters; over all files, how many rows were
    rejected for each reason and each kind (details stay in rejects/).

    One pass over the finished rows (their counted columns, grouped by file with ``new_keys``
    to tell the rows scored now): each block sums its own counters by (file, reason, kind),
    the driver adds the blocks' sums.

    Args:
        rows: The finished rows (``SCORED_ROWS_SCHEMA``).
        new_keys: The row keys of the rows whose trace this run found new
            (``lookup.new_row_keys``); None when it found none.

    Raises:
        AccountingError: An accepted row has no scores (its trace is neither scored nor in the
            cache).
    """
    rows = rows.select_columns(_COUNTED).map_batches(
        _flagged, fn_kwargs={"now": False}, batch_format="pyarrow"
    )
    if new_keys is not None:
        # The rows and the keys of the new ones, grouped by file (a sort, in tasks alone):
        # each file's rows are marked from its own keys.
        flags = new_keys.map_batches(_flagged, fn_kwargs={"now": True}, batch_format="pyarrow")
        rows = (
            rows.union(flags)
            .groupby("source_file", num_partitions=reduce_partitions())
            .map_groups(_mark_now, batch_format="pyarrow")
        )

    def partial_sums(table: pa.Table) -> pa.Table:
        rejected = pc.is_valid(table["reject_reason"])
        new = pc.and_(pc.fill_null(table["now"], False), pc.invert(rejected))
        counters = pa.table(
            {
                "source_file": table["source_file"],
                "reason": reason_kinds(table["reject_reason"]),
                "kind": table["reject_kind"],
                "rows_scored": pc.cast(pc.invert(rejected), pa.int64()),
                "rows_rejected": pc.cast(rejected, pa.int64()),
                "input_rows": pc.cast(pc.fill_null(pc.equal(table["item"], 0), True), pa.int64()),
                "shard_errors": pc.cast(pc.is_null(table["row_number"]), pa.int64()),
                "tokens_scored": pc.if_else(rejected, 0, pc.fill_null(table["n_tokens"], 0)),
                "model_tokens": pc.if_else(rejected, 0, pc.fill_null(table["model_tokens"], 0)),
                "tokens_scored_now": pc.if_else(new, pc.fill_null(table["n_tokens"], 0), 0),
                "model_tokens_now": pc.if_else(new, pc.fill_null(table["model_tokens"], 0), 0),
                "unscored": pc.cast(is_unscored(table), pa.int64()),
            }
        )
        keys = ["source_file", "reason", "kind"]
        summed = counters.group_by(keys, use_threads=False).aggregate(
            [(name, "sum") for name in _COUNTERS]
        )
        return summed.rename_columns([n.removesuffix("_sum") for n in summed.column_names])

    sums = pd.DataFrame(rows.map_batches(partial_sums, batch_format="pyarrow").take_all())
    if sums.empty:
        return RowCounts({}, {}, {})
    unscored = int(sums["unscored"].sum())
    if unscored:
        raise AccountingError(
            f"{unscored} accepted rows have no scores (not scored, not in the cache)"
        )
    per_file = sums.groupby("source_file")[list(PER_FILE)].sum()
    reasons = sums.dropna(subset=["reason"]).groupby("reason")["rows_rejected"].sum()
    kinds = sums.dropna(subset=["kind"]).groupby("kind")["rows_rejected"].sum()
    return RowCounts(
        {name: {c: int(v) for c, v in counts.items()} for name, counts in per_file.iterrows()},
        {reason: int(n) for reason, n in sorted(reasons.items())},
        {kind: int(n) for kind, n in sorted(kinds.items())},
    )


_COUNTED = [*ROW_KEY, "reject_reason", "reject_kind", "n_tokens", "model_tokens"]
_COUNTED_NOW = pa.schema(
    [*(SCORED_ROWS_SCHEMA.field(name) for name in _COUNTED), pa.field("now", pa.bool_())]
)


def _flagged(table: pa.Table, now: bool) -> pa.Table:
    """``table`` in ``_COUNTED_NOW`` (the columns it lacks null), ``now`` on every row: the
    rows themselves (False), or the keys of the new ones (True)."""
    flags = pa.array([now] * table.num_rows, pa.bool_())
    flagged = padded(table, _COUNTED_NOW)
    return flagged.set_column(_COUNTED_NOW.get_field_index("now"), "now", flags)


def _mark_now(group: pa.Table) -> pa.Table:
    """One file's rows, each marked ``now`` when the file's new keys hold its row key."""
    keys = row_keys(group.filter(group["now"]))
    rows = group.filter(pc.invert(group["now"]))
    now = pc.fill_null(pc.is_in(row_keys(rows), value_set=keys), False)
    return rows.set_column(rows.schema.get_field_index("now"), "now", now)


def check_inputs(
    inputs: Inputs, per_file: dict[str, dict[str, int]], expected: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per input file: rows read == rows scored + rows rejected, and nothing went missing.

    A file the independent count could not read must be one the pipeline could not read either
    (a corrupt Parquet footer, one reject row): a file whose rows were read while the count
    failed on it has no proof that none went missing.
    """
    entries, lost = [], []
    for (path, fmt), source in zip(inputs.files, expected):
        shown = inputs.shown(path)
        counts = per_file.get(shown, dict.fromkeys(PER_FILE, 0))
        entry = {"path": shown, "format": fmt, **source}
        entry.update(counts)
        entry["rows_read"] = counts["rows_scored"] + counts["rows_rejected"]
        readable = counts["input_rows"] - counts["shard_errors"]
        if source.get("rows_in_file") is None:
            if not counts["shard_errors"]:
                lost.append(
                    f"{shown}: the independent row count could not read the file "
                    f"({source.get('unreadable')}), yet {readable} rows were read from it"
                )
        elif readable != source["rows_in_file"]:
            lost.append(f"{shown}: {source['rows_in_file']} rows in the file, {readable} read")
        entries.append(entry)
    if lost:
        raise AccountingError(
            "rows went missing between reading and writing, or cannot be shown not to "
            "have:\n  " + "\n  ".join(lost)
        )
    return entries


def check_reject_budget(
    rows_read: int,
    kinds: dict[str, int],
    max_fraction: float,
    reasons: dict[str, int] | None = None,
) -> None:
    """Fail a run that rejected more than ``max_fraction`` of the rows it read.

    Duplicates do not count (their trace is scored through the first copy).

    Raises:
        RejectBudgetError: With the rejects by kind, and the most common reasons (``reasons``:
            rows per ``reason_kinds``), which say what to fix.
    """
    rejected = sum(n for kind, n in kinds.items() if kind != "duplicate")
    if rows_read and rejected / rows_read > max_fraction:
        by_kind = ", ".join(f"{kind} {n:,}" for kind, n in sorted(kinds.items()))
        common = sorted(
            ((n, reason) for reason, n in (reasons or {}).items() if reason != "duplicate"),
            key=lambda item: (-item[0], item[1]),
        )[:3]
        most = "; most common: " + ", ".join(f"{r!r} {n:,}" for n, r in common) if common else ""
        raise RejectBudgetError(
            f"{rejected:,} of {rows_read:,} rows were rejected ({rejected / rows_read:.1%}, "
            f"by kind: {by_kind}{most}), more than output.max_reject_fraction={max_fraction:g} "
            "allows"
        )
