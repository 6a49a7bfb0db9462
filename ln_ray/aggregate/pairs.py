"""Paired teacher comparisons over the prompts both teachers answered.

Teachers answer the same prompts, and a prompt's difficulty moves every teacher's score
together. Comparing two teachers prompt by prompt removes that shared part, so a paired
difference separates teachers that independent intervals (one per teacher, each over its own
traces) leave overlapping.

Each teacher's value on a prompt is the mean over its traces for that prompt (finite values
only). The mean uses every trace, does not depend on the selection's settings (a selection
picks the best trace, and comparing picked traces would favour the teacher with more samples),
and is the same for the teacher table's per-teacher means when a teacher answers each prompt
once.

The bootstrap resamples prompts: one set of resamples serves every pair and every metric, so
the intervals are coherent (A - B and B - A mirror each other, and every pair sees the same
draws). Its work is bounded at any corpus size: prompts are hashed into at most
``MAX_GROUPS`` groups and the groups are resampled, with each group's sums (a bootstrap over
groups of prompts assigned at random is a bootstrap over prompts, and with fewer prompts than
``MAX_GROUPS`` each prompt is its own group). A resample is then one matrix product over the
groups, whatever the number of prompts, and ``samples`` resamples cost ``samples x groups x
columns`` multiply-adds, in chunks of bounded memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ln_ray.schema import TEACHER_METRICS as HIGHER_IS_BETTER
from ln_ray.schema import TEACHER_PAIRS_SCHEMA

RSR_DATASET = "rsr_dataset"  # sum(avg_rank) / sum(avg_surprisal), not a mean
# The per-trace metrics (each teacher's value on a prompt is their mean over its traces).
TRACE_METRICS = [name for name in HIGHER_IS_BETTER if name != RSR_DATASET]
_SUMMED = [*TRACE_METRICS, "rsr_rank", "rsr_surprisal"]
# What ``prompt_sums`` returns: per (prompt, teacher), each summed value's sum and count.
PROMPT_SUMS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("teacher", pa.string()),
        *[
            (f"{name}_{part}", kind)
            for name in _SUMMED
            for part, kind in (("sum", pa.float64()), ("n", pa.int64()))
        ],
    ]
)
MAX_GROUPS = 10_000
_CELLS = 4_000_000  # resample weights drawn per chunk (samples x groups)


@dataclass(frozen=True)
class PromptTable:
    """Each teacher's value on each prompt, per metric.

    Attributes:
        prompts: Prompt ids, sorted.
        teachers: Teacher names, sorted.
        values: Per metric (``TRACE_METRICS``, and ``rsr_rank`` and ``rsr_surprisal``: the means
            of avg_rank and avg_surprisal over traces where both are finite, for rsr_dataset),
            a ``[prompts x teachers]`` array, NaN where the teacher has no finite value there.
    """

    prompts: np.ndarray
    teachers: list[str]
    values: dict[str, np.ndarray]

    def ratio_parts(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """The metric's numerator and denominator per prompt and teacher (NaN where missing):
        a mean is its per-prompt value over 1, rsr_dataset is sum(rank) / sum(surprisal)."""
        if metric == RSR_DATASET:
            return self.values["rsr_rank"], self.values["rsr_surprisal"]
        top = self.values[metric]
        return top, np.ones_like(top)


def prompt_sums(scores: pa.Table) -> pa.Table:
    """Per (prompt_id, teacher) in ``scores``: each metric's sum and count of finite values (the
    sums of any split of the traces add up, so blocks can be summed apart and merged).

    Traces are summed in trace_id order: a float sum depends on the order of its terms, and a
    group's sum must not depend on the order its rows arrived in.
    """
    import polars as pl

    frame = pl.from_arrow(scores.select(["prompt_id", "teacher", "trace_id", *TRACE_METRICS]))
    assert isinstance(frame, pl.DataFrame)
    frame = frame.sort(["prompt_id", "teacher", "trace_id"])
    both = pl.col("avg_rank").is_finite() & pl.col("avg_surprisal").is_finite()
    columns = {name: pl.col(name).cast(pl.Float64) for name in TRACE_METRICS}
    columns["rsr_rank"] = pl.when(both).then(pl.col("avg_rank")).cast(pl.Float64)
    columns["rsr_surprisal"] = pl.when(both).then(pl.col("avg_surprisal")).cast(pl.Float64)
    aggregations = []
    for name, column in columns.items():
        finite = column.is_finite().fill_null(False)
        aggregations.append(pl.when(finite).then(column).otherwise(0.0).sum().alias(f"{name}_sum"))
        aggregations.append(finite.cast(pl.Int64).sum().alias(f"{name}_n"))
    summed = frame.group_by(["prompt_id", "teacher"], maintain_order=True).agg(aggregations)
    return (
        summed.sort(["prompt_id", "teacher"])
        .to_arrow()
        .select(PROMPT_SUMS_SCHEMA.names)
        .cast(PROMPT_SUMS_SCHEMA)
    )


def merge_prompt_sums(parts: pa.Table) -> PromptTable:
    """Add up ``prompt_sums`` of several blocks into the prompt table."""
    import polars as pl

    frame = pl.from_arrow(parts)
    assert isinstance(frame, pl.DataFrame)
    names = [c for c in frame.columns if c not in ("prompt_id", "teacher")]
    frame = frame.group_by(["prompt_id", "teacher"]).agg(pl.col(names).sum())
    prompts = np.asarray(sorted(frame["prompt_id"].unique().to_list()), dtype=object)
    teachers = sorted(frame["teacher"].unique().to_list())
    row = np.searchsorted(prompts, np.asarray(frame["prompt_id"].to_list(), dtype=object))
    column = np.searchsorted(np.asarray(teachers, dtype=object), frame["teacher"].to_list())
    values = {}
    for name in _SUMMED:
        table = np.full((len(prompts), len(teachers)), np.nan)
        sums, counts = frame[f"{name}_sum"].to_numpy(), frame[f"{name}_n"].to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            table[row, column] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        values[name] = table
    return PromptTable(prompts, teachers, values)


def prompt_table(scores: pa.Table) -> PromptTable:
    """The prompt table of a table of scored traces, in one piece."""
    return merge_prompt_sums(prompt_sums(scores))


def paired_comparisons(
    table: PromptTable, *, samples: int, confidence: float, seed: int
) -> pa.Table:
    """Every ordered pair of teachers, on every metric, over the prompts both answered.

    Args:
        table: The prompt table.
        samples: Bootstrap resamples (0: no interval).
        confidence: Interval coverage, e.g. 0.95.
        seed: Seed of the resamples.

    Returns:
        ``TEACHER_PAIRS_SCHEMA`` rows: mean_diff is A's value minus B's (the metric's own sign), the
        interval is its bootstrap percentile interval, win_rate the share of shared prompts
        where A is better by the metric's direction (a tie counts half), and separated whether
        the interval excludes zero.
    """
    teachers = table.teachers
    pairs = [(a, b) for a in range(len(teachers)) for b in range(a + 1, len(teachers))]
    if not pairs:
        return TEACHER_PAIRS_SCHEMA.empty_table()
    # Per metric and pair, four group sums over the shared prompts: A's numerator and
    # denominator, and B's. A mean is sum / count; rsr_dataset is sum(rank) / sum(surprisal).
    groups = prompt_groups(table.prompts)
    sums: list[list[np.ndarray]] = [[], [], [], []]
    wins = []
    for metric in HIGHER_IS_BETTER:
        top, bottom = table.ratio_parts(metric)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_prompt = top / bottom
        for a, b in pairs:
            parts = (top[:, a], bottom[:, a], top[:, b], bottom[:, b])
            shared = np.logical_and.reduce([np.isfinite(part) for part in parts])
            for family, column in zip(sums, parts):
                family.append(
                    np.bincount(groups, weights=np.where(shared, column, 0.0), minlength=1)
                )
            first, second = per_prompt[shared, a], per_prompt[shared, b]
            better = first > second if HIGHER_IS_BETTER[metric] else first < second
            wins.append((better.sum() + 0.5 * (first == second).sum(), int(shared.sum())))
    stacked = [np.stack(family, axis=1) for family in sums]  # [groups x columns]
    estimate = _ratio_difference(stacked, np.ones((1, stacked[0].shape[0])))[0]
    low = high = np.full_like(estimate, np.nan)
    if samples:
        rng = np.random.default_rng([seed, stable_hash("pairs")])
        draws = _resampled(stacked, samples, rng)
        alpha = (1.0 - confidence) / 2.0
        with np.errstate(all="ignore"):
            low, high = np.nanquantile(draws, [alpha, 1.0 - alpha], axis=0)
    rows = []
    for k, (metric, (a, b)) in enumerate(
        (metric, pair) for metric in HIGHER_IS_BETTER for pair in pairs
    ):
        won, shared = wins[k]
        if shared == 0:
            continue
        rate = won / shared
        separated = bool(samples) and bool(low[k] > 0 or high[k] < 0)
        mirrored = ((a, b, 1.0, low[k], high[k], rate), (b, a, -1.0, -high[k], -low[k], 1 - rate))
        for first, second, sign, lower, upper, share in mirrored:
            rows.append(
                {
                    "teacher_a": teachers[first],
                    "teacher_b": teachers[second],
                    "metric": metric,
                    "mean_diff": float(sign * estimate[k]),
                    "ci_low": float(lower),
                    "ci_high": float(upper),
                    "win_rate": float(share),
                    "n_prompts": shared,
                    "separated": separated,
                }
            )
    return pa.Table.from_pylist(rows, schema=TEACHER_PAIRS_SCHEMA)


def prompt_groups(prompts: np.ndarray) -> np.ndarray:
    """Each prompt's bootstrap group: itself while there are at most ``MAX_GROUPS`` prompts,
    else a hash of its id (so groups do not depend on input order)."""
    if len(prompts) <= MAX_GROUPS:
        return np.arange(len(prompts))
    return np.array([stable_hash(str(p)) % MAX_GROUPS for p in prompts], dtype=np.int64)


def _ratio_difference(sums: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``[resamples x columns]`` of A's ratio minus B's under group ``weights``."""
    top_a, bottom_a, top_b, bottom_b = (weights @ s for s in sums)
    with np.errstate(invalid="ignore", divide="ignore"):
        return top_a / bottom_a - top_b / bottom_b


def _resampled(sums: list[np.ndarray], samples: int, rng: np.random.Generator) -> np.ndarray:
    """``[samples x columns]`` estimates, each from groups drawn with replacement."""
    groups = sums[0].shape[0]
    per_chunk = max(1, _CELLS // max(groups, 1))
    draws = []
    for start in range(0, samples, per_chunk):
        count = min(per_chunk, samples - start)
        picks = rng.integers(0, groups, size=(count, groups))
        offsets = picks + groups * np.arange(count)[:, None]
        weights = np.bincount(offsets.ravel(), minlength=count * groups).reshape(count, groups)
        draws.append(_ratio_difference(sums, weights.astype(float)))
    return np.concatenate(draws)


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
