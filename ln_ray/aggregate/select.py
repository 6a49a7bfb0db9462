"""Per-prompt selection: the best eligible trace by each metric, deterministically, vectorized.

Selection is an argmax (argmin for RSR and IFD, where lower is better) per (prompt, metric)
under one total order: the metric, then teacher name, then trace_id. That order makes it
decomposable: the best of any split of a prompt's candidates is the best of the splits' bests,
and the counts add up. So the job selects within each block of the scores
(``partial_selections``, after a sort that keeps a prompt's rows together but for the blocks'
edges) and merges the blocks' winners (``merge_selections``); no Python runs per prompt or per
row.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from ln_ray.schema import SELECTED_BY, SELECTIONS_SCHEMA, TEACHER_METRICS

# Which way is better for each metric a trace is selected by.
HIGHER_IS_BETTER = {metric: TEACHER_METRICS[metric] for metric in SELECTED_BY}
CANDIDATE_COLUMNS = ["prompt_id", "teacher", "trace_id", "correct", *SELECTED_BY]


def select_traces(scores: pa.Table, *, filter_correct: bool) -> pa.Table:
    """The best trace per prompt and metric among the eligible candidates.

    Candidates are the scored traces (only those with ``correct == True`` when
    ``filter_correct``) whose metric is finite. Ties are broken by teacher name, then trace_id.

    Args:
        scores: Scored traces (``CANDIDATE_COLUMNS`` at least), any number of prompts.
        filter_correct: Keep only traces marked correct.

    Returns:
        One row per (prompt, metric) with a candidate, in ``SELECTIONS_SCHEMA``.
    """
    return merge_selections(partial_selections(scores, filter_correct=filter_correct))


def partial_selections(scores: pa.Table, *, filter_correct: bool) -> pa.Table:
    """Each (prompt, metric)'s best candidate among ``scores`` and how many there were."""
    frame = pl.from_arrow(scores.select(CANDIDATE_COLUMNS))
    assert isinstance(frame, pl.DataFrame)
    if filter_correct:
        frame = frame.filter(pl.col("correct").fill_null(False))
    long = pl.concat(
        [
            frame.select(
                "prompt_id",
                "teacher",
                "trace_id",
                pl.lit(metric).alias("metric"),
                pl.col(metric).cast(pl.Float64).alias("score"),
            ).filter(pl.col("score").is_finite())
            for metric in HIGHER_IS_BETTER
        ]
    )
    return _best(long.with_columns(n_candidates=pl.lit(1, pl.Int64)))


def merge_selections(partials: pa.Table) -> pa.Table:
    """Merge partial selections (``SELECTIONS_SCHEMA``) of disjoint splits of the candidates."""
    frame = pl.from_arrow(partials.select(SELECTIONS_SCHEMA.names))
    assert isinstance(frame, pl.DataFrame)
    return _best(frame)


def _best(frame: pl.DataFrame) -> pa.Table:
    """Per (prompt, metric): the first row in the selection order, with the summed counts."""
    key = (
        pl.when(pl.col("metric").is_in([m for m, up in HIGHER_IS_BETTER.items() if up]))
        .then(-pl.col("score"))
        .otherwise(pl.col("score"))
    )
    best = (
        frame.with_columns(_key=key)
        .sort(["prompt_id", "metric", "_key", "teacher", "trace_id"])
        .group_by(["prompt_id", "metric"], maintain_order=True)
        .agg(
            pl.col("teacher").first(),
            pl.col("trace_id").first(),
            pl.col("score").first(),
            pl.col("n_candidates").sum(),
        )
    )
    return best.to_arrow().select(SELECTIONS_SCHEMA.names).cast(SELECTIONS_SCHEMA)


# For each ordered pair of selection metrics: the prompts where both selected a trace, and those
# where they selected the same one.
AGREEMENT_SCHEMA = pa.schema(
    [
        ("metric", pa.string()),
        ("other", pa.string()),
        ("prompts", pa.int64()),
        ("same", pa.int64()),
    ]
)


def agreement_counts(selections: pa.Table) -> pa.Table:
    """How often the metrics select the same trace, over the prompts of ``selections``
    (``AGREEMENT_SCHEMA``, a row per ordered pair of metrics). The counts of disjoint sets of
    prompts add up."""
    frame = pl.from_arrow(selections.select(["prompt_id", "metric", "trace_id"]))
    assert isinstance(frame, pl.DataFrame)
    wide = frame.pivot(
        on="metric", index="prompt_id", values="trace_id", aggregate_function="first"
    )
    rows = []
    for metric in HIGHER_IS_BETTER:
        for other in HIGHER_IS_BETTER:
            if metric in wide.columns and other in wide.columns:
                both = wide[metric].is_not_null() & wide[other].is_not_null()
                same = both & (wide[metric] == wide[other]).fill_null(False)
                rows.append((metric, other, int(both.sum()), int(same.sum())))
            else:
                rows.append((metric, other, 0, 0))
    return pa.Table.from_pylist(
        [dict(zip(AGREEMENT_SCHEMA.names, row)) for row in rows], schema=AGREEMENT_SCHEMA
    )
