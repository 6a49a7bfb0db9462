"""What ``ln-ray report`` reads of a run's scores, in memory bounded at any corpus size.

The report never loads ``scores/`` whole (at five million traces its scores alone are gigabytes
in pandas). It streams the columns it needs in batches of ``BATCH_ROWS`` rows, twice:

- the first pass counts the traces and teachers, keeps a sample of each teacher's traces for
  the distribution plots (the ``SAMPLE_PER_TEACHER`` traces with the smallest hash of their
  trace_id: a uniform sample, the same whatever the order of files and batches), and sums lalp
  and galp (both finite) into their means and standard deviations;
- the second keeps the traces whose lalp and galp z-scores differ most (the disagreements the
  report shows with their text), exactly as over the whole table.

Memory: a batch, the sample (teachers x ``SAMPLE_PER_TEACHER`` rows) and a handful of traces.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa

from ln_ray.aggregate.select import SELECTED_BY
from ln_ray.io.run_folder import PublishedRun
from ln_ray.schema import SCORES_SCHEMA

SAMPLE_PER_TEACHER = 5_000
BATCH_ROWS = 65_536
SHOWN = ["prompt_id", "teacher", "trace_id", *SELECTED_BY]
_FLOATS = {metric: pl.Float64 for metric in SELECTED_BY}


@dataclass(frozen=True)
class ScoresView:
    """What the report shows of a run's scores.

    Attributes:
        traces: Scored traces in the run.
        teachers: Their teachers, sorted.
        sample: Up to ``SAMPLE_PER_TEACHER`` traces per teacher (``SHOWN`` columns).
        disagreements: The traces whose lalp and galp disagree most (``SHOWN`` and ``gap``, the
            z-score of lalp minus that of galp), largest gap first.
    """

    traces: int
    teachers: list[str]
    sample: pd.DataFrame
    disagreements: pd.DataFrame


def read_scores(
    run: PublishedRun, disagreements: int, per_teacher: int = SAMPLE_PER_TEACHER
) -> ScoresView:
    """Stream ``scores/`` twice into a ``ScoresView`` (see the module's docstring)."""
    traces, teachers = 0, set()
    sample = _empty()
    moments = _Moments()
    for frame in _batches(run):
        traces += frame.height
        teachers.update(frame["teacher"].unique().to_list())
        sample = _smallest_hashes(pl.concat([sample, frame]), per_teacher)
        moments.add(_usable(frame))
    worst = _empty().with_columns(gap=pl.lit(None, pl.Float64))
    if moments.count >= 2:
        for frame in _batches(run):
            gapped = moments.gaps(_usable(frame))
            worst = pl.concat([worst, gapped]).sort(pl.col("gap").abs(), descending=True)
            worst = worst.head(disagreements)
    elif moments.count:  # one usable trace: no spread to measure a gap by
        first = next(u for u in map(_usable, _batches(run)) if u.height)
        worst = first.head(1).with_columns(gap=pl.lit(0.0))
    return ScoresView(
        traces=traces,
        teachers=sorted(teachers),
        sample=sample.sort(["teacher", "trace_id"]).to_pandas(),
        disagreements=worst.to_pandas(),
    )


def _batches(run: PublishedRun) -> Iterator[pl.DataFrame]:
    # By schema: a metric a run was scored without (older scores/) reads as null.
    for batch in run.batches("scores", SHOWN, BATCH_ROWS, SCORES_SCHEMA):
        frame = pl.from_arrow(pa.Table.from_batches([batch]))
        assert isinstance(frame, pl.DataFrame)
        yield frame.select(SHOWN)


def _empty() -> pl.DataFrame:
    schema = {name: pl.String for name in ("prompt_id", "teacher", "trace_id")}
    return pl.DataFrame(schema={**schema, **_FLOATS})


def _smallest_hashes(frame: pl.DataFrame, per_teacher: int) -> pl.DataFrame:
    """Per teacher, the rows with the smallest hash of their trace_id (ties by trace_id)."""
    key = pl.col("trace_id").hash(seed=0)
    return (
        frame.cast(_FLOATS)
        .sort([key, pl.col("trace_id")])
        .group_by("teacher", maintain_order=True)
        .head(per_teacher)
        .select(SHOWN)
    )


def _usable(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows with both lalp and galp (not null, not NaN)."""
    both = pl.col("lalp").is_not_null() & pl.col("galp").is_not_null()
    frame = frame.cast(_FLOATS)
    return frame.filter(both & pl.col("lalp").is_not_nan() & pl.col("galp").is_not_nan())


class _Moments:
    """Running count, means and sums of squared deviations of lalp and galp (Chan et al.'s
    pairwise update, exact to rounding whatever the batches)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = np.zeros(2)
        self.m2 = np.zeros(2)

    def add(self, frame: pl.DataFrame) -> None:
        if not frame.height:
            return
        values = frame.select("lalp", "galp").to_numpy()
        n, mean = len(values), values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
        self.mean = self.mean + delta * n / total
        self.count = total

    def gaps(self, frame: pl.DataFrame) -> pl.DataFrame:
        """``frame`` with ``gap``: lalp's z-score minus galp's (a zero spread counts as 1)."""
        std = np.sqrt(self.m2 / self.count)
        std = np.where(std == 0, 1.0, std)
        z_lalp = (pl.col("lalp") - self.mean[0]) / std[0]
        z_galp = (pl.col("galp") - self.mean[1]) / std[1]
        return frame.with_columns(gap=z_lalp - z_galp)
