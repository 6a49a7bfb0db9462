"""Per-teacher statistics: means with bootstrap confidence intervals, wins and ranks.

Each teacher's interval resamples its own traces; whether two teachers are told apart is the
paired comparison's business (``pairs.py``), and the table's ``separated_from_next`` comes from
there.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from ln_ray.aggregate.pairs import RSR_DATASET, TRACE_METRICS
from ln_ray.aggregate.select import HIGHER_IS_BETTER as SELECTED_ON
from ln_ray.schema import TEACHER_METRICS, TEACHERS_SCHEMA, better_direction

_BOOTSTRAP_CELLS = 4_000_000  # resample indices drawn per chunk (bounds memory)


def teacher_stats(
    group: pd.DataFrame, *, samples: int, confidence: float, seed: int
) -> pd.DataFrame:
    """Mean and bootstrap CI of each metric over one teacher's traces.

    The bootstrap resamples traces with replacement (``samples`` times) and takes the percentile
    interval; the same resamples serve every metric. The generator is seeded from ``seed`` and the
    teacher's name, and rows are put in a canonical order first, so results depend neither on how
    teachers are spread over workers nor on the order their rows arrive in.

    Args:
        group: All scored traces of one teacher.
        samples: Bootstrap resamples (0: no interval).
        confidence: Interval coverage, e.g. 0.95.
        seed: Base seed.

    Returns:
        One row per metric (``TEACHER_METRICS``): teacher, metric, mean, ci_low, ci_high, count.
    """
    teacher = str(group["teacher"].iloc[0])
    rng = np.random.default_rng([seed, _stable_hash(teacher)])
    # The resamples index rows: put them in an order that does not depend on the shuffle.
    group = group.sort_values(TRACE_METRICS, kind="stable", ignore_index=True)
    statistics = {
        metric: _finite(group, [metric], lambda v: v[0].mean(axis=-1)) for metric in TRACE_METRICS
    }
    statistics[RSR_DATASET] = _finite(
        group, ["avg_rank", "avg_surprisal"], lambda v: v[0].sum(axis=-1) / v[1].sum(axis=-1)
    )
    rows = []
    for metric in TEACHER_METRICS:
        values, statistic = statistics[metric]
        n = values.shape[1]
        low = high = mean = float("nan")
        if n:
            mean = float(statistic(values))
            if samples:
                estimates = _bootstrap(values, statistic, samples, rng)
                alpha = (1.0 - confidence) / 2.0
                low, high = (float(q) for q in np.quantile(estimates, [alpha, 1.0 - alpha]))
        rows.append(
            {
                "teacher": teacher,
                "metric": metric,
                "mean": mean,
                "ci_low": low,
                "ci_high": high,
                "count": n,
            }
        )
    return pd.DataFrame(rows)


def count_wins(selections: pd.DataFrame) -> pd.DataFrame:
    """Prompts won per (metric, teacher), from (a projection of) the selections table."""
    return selections.groupby(["metric", "teacher"]).size().rename("wins").reset_index()


def rank_teachers(
    stats: pd.DataFrame, wins: pd.DataFrame, pairs: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Add the direction, wins (prompts where the teacher was selected), rank (1 = best) and
    whether each teacher is told apart from the next in rank, per metric.

    A teacher with no value of a metric (``count`` 0) is not ranked on it: a metric no trace
    has (``ifd`` with ``scoring.ifd=false``, a run scored before the metric existed) has no rows,
    never a rank made of NaNs.

    Args:
        stats: Output rows of ``teacher_stats`` for every teacher.
        wins: Columns metric, teacher, wins (see ``count_wins``).
        pairs: The paired comparisons (``pairs.paired_comparisons``), if any.

    Returns:
        The teacher table in ``TEACHERS_SCHEMA`` columns, sorted by metric then rank.
    """
    stats = stats[stats["count"] > 0]
    won = {(m, t): int(n) for m, t, n in zip(wins["metric"], wins["teacher"], wins["wins"])}

    def wins_of(metric: str, teacher: str) -> int | None:
        # rsr_dataset ranks teachers on the same selections as rsr: the wins are rsr's.
        selected_on = "rsr" if metric == RSR_DATASET else metric
        return won.get((selected_on, teacher), 0) if selected_on in SELECTED_ON else None

    table = stats.assign(
        better=[better_direction(m) for m in stats["metric"]],
        wins=pd.array(
            [wins_of(m, t) for m, t in zip(stats["metric"], stats["teacher"])], dtype="Int64"
        ),
    )
    ranked = []
    for metric, part in table.groupby("metric", sort=True):
        key = -part["mean"] if TEACHER_METRICS.get(metric, False) else part["mean"]
        part = part.assign(_key=key.fillna(np.inf)).sort_values(["_key", "teacher"])
        ranked.append(part.assign(rank=np.arange(1, len(part) + 1)).drop(columns="_key"))
    result = pd.concat(ranked, ignore_index=True) if ranked else table.assign(rank=[])
    separated = {}
    if pairs is not None:
        separated = {
            (m, a, b): bool(s)
            for m, a, b, s in zip(
                pairs["metric"], pairs["teacher_a"], pairs["teacher_b"], pairs["separated"]
            )
        }
    at_rank = {(m, r): t for m, t, r in zip(result["metric"], result["teacher"], result["rank"])}
    result["separated_from_next"] = pd.array(
        [
            separated.get((m, t, at_rank.get((m, r + 1))))
            for m, t, r in zip(result["metric"], result["teacher"], result["rank"])
        ],
        dtype="boolean",
    )
    return result[TEACHERS_SCHEMA.names].reset_index(drop=True)


def _finite(group: pd.DataFrame, columns: list[str], statistic):
    values = group[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float).T
    keep = np.isfinite(values).all(axis=0)
    return values[:, keep], statistic


def _bootstrap(values: np.ndarray, statistic, samples: int, rng: np.random.Generator) -> np.ndarray:
    n = values.shape[1]
    per_chunk = max(1, _BOOTSTRAP_CELLS // n)
    estimates = []
    for start in range(0, samples, per_chunk):
        index = rng.integers(0, n, size=(min(per_chunk, samples - start), n))
        estimates.append(statistic(values[:, index]))
    return np.concatenate(estimates)


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
