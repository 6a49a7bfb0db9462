"""The reduce stage on Ray Data: selections and teacher table (groupbys), the curated set.

It reads a run's ``scores/``, ``_rows/`` and the rows' text from wherever they lie (the scoring
run's own folder, or a published run's, ``PublishedRun``) and writes ``selections/``,
``teachers/``, ``teacher_pairs/``, ``teacher_stability/`` and ``curated/`` into a run's folder,
so it serves both a scoring run and ``ln-ray select`` over a finished run.

Every step groups whole prompts (a hash of prompt_id, ``ray_ops.grouped_by_hash``), so each
group's result is final and nothing per prompt or per row comes to the driver: it receives
teacher-level tables only. The paired bootstrap and the stability curve resample prompts, so
one task (not the driver) holds the prompt table, prompts x teachers.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ln_ray.aggregate.curate import curated_schema, extra_schema
from ln_ray.aggregate.pairs import (
    PROMPT_SUMS_SCHEMA,
    TRACE_METRICS,
    merge_prompt_sums,
    paired_comparisons,
    prompt_sums,
)
from ln_ray.aggregate.select import (
    AGREEMENT_SCHEMA,
    CANDIDATE_COLUMNS,
    HIGHER_IS_BETTER,
    agreement_counts,
    select_traces,
)
from ln_ray.aggregate.stability import ranking_stability, stability_statement, stable_from
from ln_ray.aggregate.teachers import count_wins, rank_teachers, teacher_stats
from ln_ray.config import OutputConfig, SelectionConfig
from ln_ray.io.run_folder import RunFolder
from ln_ray.pipeline.curated import Tables, write_curated
from ln_ray.pipeline.ray_ops import (
    collect,
    count_valid,
    grouped_by_hash,
    reduce_partitions,
    to_pandas,
    write_dataset,
)
from ln_ray.schema import (
    SCORES_SCHEMA,
    SELECTIONS_SCHEMA,
    TEACHER_METRICS,
    TEACHER_PAIRS_SCHEMA,
    TEACHER_STABILITY_SCHEMA,
    TEACHERS_SCHEMA,
)

_STATS = ["teacher", "metric", "mean", "ci_low", "ci_high", "count"]  # of teacher_stats
_WINS = pa.schema([("metric", pa.string()), ("teacher", pa.string()), ("wins", pa.int64())])


def reduce_scores(
    source: Tables,
    text: str,
    target: RunFolder,
    selection: SelectionConfig,
    output: OutputConfig | None = None,
) -> dict[str, Any]:
    """Write selections/, teachers/, teacher_pairs/, teacher_stability/ and curated/ into
    ``target`` from a run's scores.

    Args:
        source: Where the run's ``scores/`` and ``_rows/`` (which rows hold the selected traces)
            lie.
        text: The output holding the rows' text (``_valid/``), joined back for the curated set.
        target: The run folder to write into.
        selection: Selection options.
        output: The output options: the curated set's conversation in
            ``output.messages_format`` (OpenAI-style messages by default).

    Returns:
        The manifest's ``selection`` entry (with ``reduce_s``).
    """
    import ray

    started = time.time()
    messages_format = (output or OutputConfig()).messages_format
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
            ("curated", curated_schema(extra_schema([]), messages_format)),
        ):
            target.ensure_table(name, schema)
        return {**summary, "prompts": 0, "prompts_selected": 0, "reduce_s": _since(started)}
    partitions = reduce_partitions()
    selections = (
        grouped_by_hash(
            scores.select_columns(CANDIDATE_COLUMNS),
            "prompt_id",
            select_traces,
            partitions,
            filter_correct=filter_correct,
        )
        .sort(["prompt_id", "metric"])
        .materialize()
    )
    write_dataset(selections, target, "selections")
    target.ensure_table("selections", SELECTIONS_SCHEMA)
    # No rows when no prompt has an eligible candidate (e.g. none is marked correct).
    wins = _wins(selections)
    summary["agreement"] = _agreement(selections, partitions)
    sums = grouped_by_hash(
        scores.select_columns(["prompt_id", "teacher", "trace_id", *TRACE_METRICS]),
        "prompt_id",
        prompt_sums,
        partitions,
    ).materialize()
    # The paired bootstrap and the stability curve resample prompts: one task holds the
    # prompt table (prompts x teachers), never the driver.
    pairs, curve, prompts, teachers = ray.get(
        ray.remote(num_cpus=1)(_compare).remote(sums.to_arrow_refs(), selection)
    )
    target.write_table("teacher_pairs/part-0.parquet", pairs)
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
    table = rank_teachers(to_pandas(stats, _STATS), wins, pairs.to_pandas())
    target.write_table(
        "teachers/part-0.parquet",
        pa.Table.from_pandas(table, schema=TEACHERS_SCHEMA, preserve_index=False),
    )
    # A metric no teacher has a value of is not ranked, so its ranking has no stability.
    ranked = sorted(set(table["metric"]))
    curve = curve.filter(pc.is_in(curve["metric"], value_set=pa.array(ranked, pa.string())))
    target.write_table("teacher_stability/part-0.parquet", curve)
    summary["stability"] = {
        metric: {
            "stable_from": stable_from(curve, metric),
            "prompts": prompts,
            "statement": stability_statement(curve, metric, teachers),
        }
        for metric in TEACHER_METRICS
        if metric in ranked
    }
    write_curated(
        source, text, target, selections, partitions, messages_format, selection.curate_by
    )
    return {
        **summary,
        "prompts": prompts,
        "prompts_selected": int(wins.loc[wins["metric"] == selection.curate_by, "wins"].sum()),
        "reduce_s": _since(started),
    }


def _wins(selections: Any) -> pd.DataFrame:
    """Prompts won per (metric, teacher): counted per block, added up in the driver (a row per
    metric and teacher)."""
    counted = collect(
        selections.select_columns(["metric", "teacher"]).map_batches(
            count_wins,
            batch_format="pandas",
        ),
        _WINS,
    ).to_pandas()
    return counted.groupby(["metric", "teacher"], as_index=False)["wins"].sum()


def _agreement(selections: Any, partitions: int) -> list[dict[str, Any]]:
    """How often the metrics select the same trace (``AGREEMENT_SCHEMA`` rows, for the
    report): counted per group of whole prompts, added up in the driver (a row per pair of
    metrics)."""
    counted = collect(
        grouped_by_hash(selections, "prompt_id", agreement_counts, partitions), AGREEMENT_SCHEMA
    )
    summed = counted.group_by(["metric", "other"], use_threads=False).aggregate(
        [("prompts", "sum"), ("same", "sum")]
    )
    found = {(r["metric"], r["other"]): r for r in summed.to_pylist()}
    return [
        {
            "metric": metric,
            "other": other,
            "prompts": found.get((metric, other), {}).get("prompts_sum", 0),
            "same": found.get((metric, other), {}).get("same_sum", 0),
        }
        for metric in HIGHER_IS_BETTER
        for other in HIGHER_IS_BETTER
    ]


def _compare(parts: list[Any], selection: SelectionConfig) -> tuple[pa.Table, pa.Table, int, int]:
    """The paired comparisons and the stability curve from the prompt sums' blocks (a task).

    Returns:
        The pairs, the curve, and how many prompts and teachers they cover.
    """
    import ray

    prompts = merge_prompt_sums(
        pa.concat_tables(
            [
                PROMPT_SUMS_SCHEMA.empty_table(),
                *(
                    b.select(PROMPT_SUMS_SCHEMA.names).cast(PROMPT_SUMS_SCHEMA)
                    for b in ray.get(parts)
                ),
            ]
        )
    )
    pairs = paired_comparisons(
        prompts,
        samples=selection.bootstrap_samples,
        confidence=selection.confidence,
        seed=selection.seed,
    )
    curve = ranking_stability(
        prompts, replicates=selection.stability_replicates, seed=selection.seed
    )
    return pairs, curve, len(prompts.prompts), len(prompts.teachers)


def _since(started: float) -> float:
    return round(time.time() - started, 3)
