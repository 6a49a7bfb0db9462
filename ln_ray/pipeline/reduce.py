"""The reduce stage on Ray Data: selections and teacher table (groupbys), the curated set.

It reads a run's ``scores/``, ``_rows/`` and the rows' text from wherever they lie (the scoring
run's own folder, or a published run's, ``PublishedRun``) and writes ``selections/``,
``teachers/``, ``teacher_pairs/``, ``teacher_stability/`` and ``curated/`` into a run's folder,
so it serves both a scoring run and ``ln-ray select`` over a finished run.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import pyarrow as pa

from ln_ray.aggregate.curate import (
    CURATED_KEYS,
    curate_batch,
    curated_schema,
    extra_schema,
    extra_types,
    keep_selected,
    with_text,
)
from ln_ray.aggregate.pairs import (
    PROMPT_SUMS_SCHEMA,
    TRACE_METRICS,
    merge_prompt_sums,
    paired_comparisons,
    prompt_sums,
)
from ln_ray.aggregate.select import CANDIDATE_COLUMNS, merge_selections, partial_selections
from ln_ray.aggregate.stability import ranking_stability, stability_statement, stable_from
from ln_ray.aggregate.teachers import count_wins, rank_teachers, teacher_stats
from ln_ray.config import SelectionConfig
from ln_ray.io.manifest import ROWS_DIR
from ln_ray.io.run_folder import RunFolder
from ln_ray.pipeline.ray_ops import (
    collect,
    count_valid,
    reduce_partitions,
    to_pandas,
    write_dataset,
)
from ln_ray.schema import (
    SCORED_ROWS_SCHEMA,
    SCORES_SCHEMA,
    SELECTIONS_SCHEMA,
    TEACHER_METRICS,
    TEACHER_PAIRS_SCHEMA,
    TEACHER_STABILITY_SCHEMA,
    TEACHERS_SCHEMA,
    TEXT_COLUMNS,
)

_CHOSEN = ["metric", "teacher", "trace_id"]  # what wins and the curated set need of selections
_STATS = ["teacher", "metric", "mean", "ci_low", "ci_high", "count"]  # of teacher_stats
# What the curated set needs of each selected row, besides its text.
_SELECTED_ROWS = pa.schema(
    [SCORED_ROWS_SCHEMA.field(name) for name in ("source_file", "row_number", *CURATED_KEYS)]
)

# What the curated set reads of _rows/ to find them (not the scores).
_ROW_KEYS = pa.schema(
    [SCORED_ROWS_SCHEMA.field(name) for name in (*_SELECTED_ROWS.names, "reject_reason")]
)


class Tables(Protocol):
    """Where a run's outputs lie: a ``RunFolder`` or a ``PublishedRun``."""

    arrow_fs: Any

    def full(self, name: str) -> str: ...


def reduce_scores(
    source: Tables, text: str, target: RunFolder, selection: SelectionConfig
) -> dict[str, Any]:
    """Write selections/, teachers/, teacher_pairs/, teacher_stability/ and curated/ into
    ``target`` from a run's scores.

    Args:
        source: Where the run's ``scores/`` and ``_rows/`` (which rows hold the selected traces)
            lie.
        text: The output holding the rows' text (``_valid/``), joined back for the curated set.
        target: The run folder to write into.
        selection: Selection options.

    Returns:
        The manifest's ``selection`` entry (with ``reduce_s``).
    """
    import ray

    started = time.time()
    arrow_fs = source.arrow_fs
    scores = ray.data.read_parquet(
        source.full("scores"), filesystem=arrow_fs, schema=SCORES_SCHEMA
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
            ("teacher_pairs", TEACHER_PAIRS_SCHEMA),
            ("teacher_stability", TEACHER_STABILITY_SCHEMA),
            ("curated", curated_schema(extra_schema([]))),
        ):
            target.ensure_table(name, schema)
        return {**summary, "prompts": 0, "prompts_selected": 0, "reduce_s": _since(started)}
    partitions = reduce_partitions()
    # A sort keeps each prompt's rows in one block (but at blocks' edges); each block's winners
    # and per-(prompt, teacher) sums are computed at once, and the driver merges the blocks'
    # (a few rows per prompt).
    ordered = (
        scores.select_columns(sorted({*CANDIDATE_COLUMNS, *TRACE_METRICS}))
        .sort("prompt_id")
        .materialize()
    )
    partials = ordered.map_batches(
        partial_selections,
        fn_kwargs={"filter_correct": filter_correct},
        batch_format="pyarrow",
        batch_size=None,
    )
    selections = merge_selections(collect(partials, SELECTIONS_SCHEMA))
    target.write_table("selections/part-0.parquet", selections)
    prompts = merge_prompt_sums(
        collect(
            ordered.map_batches(prompt_sums, batch_format="pyarrow", batch_size=None),
            PROMPT_SUMS_SCHEMA,
        )
    )
    # No rows when no prompt has an eligible candidate (e.g. none is marked correct).
    chosen = selections.select(_CHOSEN).to_pandas()
    stats = (
        scores.select_columns(["teacher", *TRACE_METRICS])
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
    pairs = paired_comparisons(
        prompts,
        samples=selection.bootstrap_samples,
        confidence=selection.confidence,
        seed=selection.seed,
    )
    target.write_table("teacher_pairs/part-0.parquet", pairs)
    curve = ranking_stability(
        prompts, replicates=selection.stability_replicates, seed=selection.seed
    )
    target.write_table("teacher_stability/part-0.parquet", curve)
    table = rank_teachers(to_pandas(stats, _STATS), count_wins(chosen), pairs.to_pandas())
    target.write_table(
        "teachers/part-0.parquet",
        pa.Table.from_pandas(table, schema=TEACHERS_SCHEMA, preserve_index=False),
    )
    summary["stability"] = {
        metric: {
            "stable_from": stable_from(curve, metric),
            "prompts": len(prompts.prompts),
            "statement": stability_statement(curve, metric, len(prompts.teachers)),
        }
        for metric in TEACHER_METRICS
    }

    picked = chosen[chosen["metric"] == "lalp"]
    # The rows holding the selected traces (one a prompt), then their text, read once.
    chosen_rows = ray.data.read_parquet(
        source.full(ROWS_DIR), filesystem=arrow_fs, columns=_ROW_KEYS.names, schema=_ROW_KEYS
    ).map_batches(
        keep_selected,
        fn_kwargs={"selected": pa.array(sorted(set(picked["trace_id"])), pa.string())},
        batch_format="pyarrow",
    )
    selected = collect(chosen_rows, _SELECTED_ROWS)
    subset = (
        ray.data.read_parquet(
            source.full(text),
            filesystem=arrow_fs,
            columns=["source_file", "row_number", *TEXT_COLUMNS],
        )
        .map_batches(with_text, fn_kwargs={"selected": selected}, batch_format="pyarrow")
        .materialize()
    )
    kinds = subset.map_batches(extra_types, batch_format="pyarrow").take_all()
    schema = curated_schema(extra_schema([(k["column"], k["kind"]) for k in kinds]))
    write_dataset(
        subset.map_batches(curate_batch, fn_kwargs={"schema": schema}, batch_format="pyarrow"),
        target,
        "curated",
    )
    target.ensure_table("curated", schema)
    return {
        **summary,
        "prompts": len(prompts.prompts),
        "prompts_selected": len(picked),
        "reduce_s": _since(started),
    }


def _since(started: float) -> float:
    return round(time.time() - started, 3)
