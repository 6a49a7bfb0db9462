"""The reduce stage on Ray Data: selections and teacher table (groupbys), the curated set.

It reads a run's ``scores/`` and ``_rows/`` and writes ``selections/``, ``teachers/`` and
``curated/`` into a run's folder, so it serves both a scoring run and ``ln-ray select`` over a
finished run.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import pyarrow as pa
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
from ln_ray.aggregate.select import CANDIDATE_COLUMNS, merge_selections, partial_selections
from ln_ray.aggregate.teachers import count_wins, rank_teachers, teacher_stats
from ln_ray.config import SelectionConfig
from ln_ray.io import storage
from ln_ray.pipeline.outputs import ensure_table, write_dataset
from ln_ray.schema import (
    SCORED_ROWS_SCHEMA,
    SCORES_SCHEMA,
    SELECTIONS_SCHEMA,
    TEACHERS_SCHEMA,
    TEXT_COLUMNS,
)

_CHOSEN = ["metric", "teacher", "trace_id"]  # what wins and the curated set need of selections
_STATS = [name for name in TEACHERS_SCHEMA.names if name not in ("wins", "rank")]
# What the curated set needs of each selected row, besides its text.
_SELECTED_ROWS = pa.schema(
    [SCORED_ROWS_SCHEMA.field(name) for name in ("source_file", "row_number", *CURATED_KEYS)]
)


def reduce_scores(
    fs: Any,
    scores_dir: str,
    rows_dir: str,
    text_dir: str,
    target: str,
    selection: SelectionConfig,
) -> dict[str, Any]:
    """Write selections/, teachers/ and curated/ under ``target`` from a run's scores.

    Args:
        fs: The output filesystem (fsspec).
        scores_dir: The run's ``scores/``.
        rows_dir: The run's ``_rows/`` (which rows hold the selected traces).
        text_dir: Where the run's rows' text is (``_valid/``), joined back for the curated set.
        target: Folder to write into.
        selection: Selection options.

    Returns:
        The manifest's ``selection`` entry (with ``reduce_s``).
    """
    import ray

    started = time.time()
    arrow_fs = storage.arrow_filesystem(fs)
    scores = ray.data.read_parquet(
        scores_dir, filesystem=arrow_fs, schema=SCORES_SCHEMA
    ).materialize()
    filter_correct = selection.require_correct and count_valid(scores, "correct") > 0
    summary = {
        "require_correct": selection.require_correct,
        "filtered_on_correct": filter_correct,
        "bootstrap_samples": selection.bootstrap_samples,
        "confidence": selection.confidence,
    }
    if scores.count() == 0:  # every row was rejected: the outputs exist, empty
        for name, schema in (
            ("selections", SELECTIONS_SCHEMA),
            ("teachers", TEACHERS_SCHEMA),
            ("curated", curated_schema(extra_schema([]))),
        ):
            ensure_table(fs, storage.join(target, name), schema)
        return {**summary, "prompts": 0, "prompts_selected": 0, "reduce_s": _since(started)}
    partitions = reduce_partitions()
    # A sort keeps each prompt's rows in one block (but at blocks' edges); each block's winners
    # are selected at once, and the driver merges the blocks' winners (a few rows per prompt).
    partials = (
        scores.select_columns(CANDIDATE_COLUMNS)
        .sort("prompt_id")
        .map_batches(
            partial_selections,
            fn_kwargs={"filter_correct": filter_correct},
            batch_format="pyarrow",
            batch_size=None,
        )
    )
    selections = merge_selections(collect(partials, SELECTIONS_SCHEMA))
    fs.makedirs(storage.join(target, "selections"), exist_ok=True)
    pq.write_table(
        selections, storage.join(target, "selections", "part-0.parquet"), filesystem=arrow_fs
    )
    # No rows when no prompt has an eligible candidate (e.g. none is marked correct).
    chosen = selections.select(_CHOSEN).to_pandas()
    stats = (
        scores.select_columns(["teacher", "lalp", "galp", "rsr", "avg_rank", "avg_surprisal"])
        .groupby("teacher", num_partitions=partitions)
        .map_groups(
            teacher_stats,
            fn_kwargs={
                "samples": selection.bootstrap_samples,
                "confidence": selection.confidence,
                "seed": selection.seed,
            },
            batch_format="pandas",
        )
    )
    table = rank_teachers(_to_pandas(stats, _STATS), count_wins(chosen))
    fs.makedirs(storage.join(target, "teachers"), exist_ok=True)
    pq.write_table(
        pa.Table.from_pandas(table, schema=TEACHERS_SCHEMA, preserve_index=False),
        storage.join(target, "teachers", "part-0.parquet"),
        filesystem=arrow_fs,
    )

    picked = chosen[chosen["metric"] == "lalp"]
    # The rows holding the selected traces (one a prompt), then their text, read once.
    chosen_rows = ray.data.read_parquet(
        rows_dir, filesystem=arrow_fs, schema=SCORED_ROWS_SCHEMA
    ).map_batches(
        keep_selected,
        fn_kwargs={"selected": pa.array(sorted(set(picked["trace_id"])), pa.string())},
        batch_format="pyarrow",
    )
    selected = collect(chosen_rows, _SELECTED_ROWS)
    subset = (
        ray.data.read_parquet(
            text_dir, filesystem=arrow_fs, columns=["source_file", "row_number", *TEXT_COLUMNS]
        )
        .map_batches(with_text, fn_kwargs={"selected": selected}, batch_format="pyarrow")
        .materialize()
    )
    kinds = subset.map_batches(extra_types, batch_format="pyarrow").take_all()
    schema = curated_schema(extra_schema([(k["column"], k["kind"]) for k in kinds]))
    write_dataset(
        subset.map_batches(curate_batch, fn_kwargs={"schema": schema}, batch_format="pyarrow"),
        storage.join(target, "curated"),
        arrow_fs,
    )
    ensure_table(fs, storage.join(target, "curated"), schema)
    return {
        **summary,
        "prompts": len(scores.unique("prompt_id")),
        "prompts_selected": len(picked),
        "reduce_s": _since(started),
    }


def _to_pandas(ds: Any, columns: list[str]) -> pd.DataFrame:
    """A dataset as a DataFrame, with ``columns`` also when it has no rows (Ray Data then returns
    a frame without any)."""
    frame = ds.to_pandas()
    return frame if len(frame.columns) else pd.DataFrame(columns=columns)


def _since(started: float) -> float:
    return round(time.time() - started, 3)


def count_valid(ds: Any, column: str) -> int:
    """Non-null values of ``column`` in a dataset."""
    counts = ds.select_columns([column]).map_batches(
        lambda t: pa.table({"n": [t.num_rows - t[column].null_count]}), batch_format="pyarrow"
    )
    return int(counts.sum("n") or 0)


def reduce_partitions() -> int:
    """Shuffle partitions for groupbys: one per cluster CPU (Ray defaults to 200, for big data)."""
    return cluster_cpus()


def cluster_cpus() -> int:
    """CPUs of the connected Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def collect(ds: Any, schema: pa.Schema) -> pa.Table:
    """A (small) dataset as one table of ``schema`` in the driver (Ray Data may hand back empty
    blocks without columns)."""
    import ray

    blocks = ray.get(ds.to_arrow_refs())
    return pa.concat_tables(
        [schema.empty_table(), *(b.select(schema.names).cast(schema) for b in blocks if b.num_rows)]
    )


def cast_to(schema: pa.Schema):
    """A batch function selecting and casting a table to ``schema``."""

    def cast(table: pa.Table) -> pa.Table:
        return table.select(schema.names).cast(schema)

    return cast
