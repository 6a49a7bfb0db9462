"""How many prompts the teacher ranking needs: the ranking on random subsets of prompts.

For a grid of subset sizes n, ``replicates`` random subsets of n prompts are drawn without
replacement, the teachers are ranked on each (by their mean over the subset's prompts, ties by
name, as the teacher table ranks them), and the curve reports how often a subset's ranking
equals the ranking on every prompt, and the mean Kendall's tau between the two. The last point
is all the prompts, where the ranking is the full one by definition (agreement 1).

The ranking is *stable from* the smallest n from which at least ``STABLE_AGREEMENT`` of subsets
agree, at that n and every larger size drawn. Subsets are drawn up to half the prompts: larger
ones share most of their prompts with the full set, so their agreement says little, and a
ranking counts as settled only when half the prompts or fewer already give it.

The work is bounded: subsets are the prefixes of random permutations of the prompts, so one
permutation gives a subset of every size at once (cumulative sums), and sizes stop at
``MAX_SUBSET`` prompts (a ranking that needs more is reported as not settled within it: its
teachers are too close to order on that metric). At a million prompts and four teachers that is
about 5 seconds on two cores, and 250 MB. With ``replicates`` = 100, an agreement's Monte-Carlo
standard error is at most 0.05 (sqrt(0.25 / 100)).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ln_ray.aggregate.pairs import HIGHER_IS_BETTER, PromptTable, stable_hash
from ln_ray.schema import TEACHER_STABILITY_SCHEMA

STABLE_AGREEMENT = 0.95
MAX_SUBSET = 20_000
_CELLS = 4_000_000  # values per chunk (replicates x prompts, or x prefix x teachers)


def subset_sizes(prompts: int) -> list[int]:
    """The sizes drawn: about four per factor of ten from 5 prompts, and half of them (at most
    ``MAX_SUBSET``); then all of them."""
    largest = min(prompts // 2, MAX_SUBSET)
    sizes, size = {largest} - {0}, 5.0
    while round(size) < largest:
        sizes.add(int(round(size)))
        size *= 10**0.25
    return sorted(sizes | {prompts})


def ranking_stability(table: PromptTable, *, replicates: int, seed: int) -> pa.Table:
    """The stability curve of every metric's ranking (``TEACHER_STABILITY_SCHEMA`` rows).

    Args:
        table: Each teacher's value on each prompt (``pairs.PromptTable``).
        replicates: Random subsets drawn per size.
        seed: Seed of the subsets.
    """
    prompts, teachers = len(table.prompts), len(table.teachers)
    if prompts == 0 or teachers == 0:
        return TEACHER_STABILITY_SCHEMA.empty_table()
    sizes = subset_sizes(prompts)
    drawn = np.asarray(sizes[:-1], dtype=np.int64)  # the last size is all the prompts
    prefix = int(drawn.max()) if len(drawn) else 0
    rng = np.random.default_rng([seed, stable_hash("stability")])
    # The first ``prefix`` prompts of each replicate's random permutation (one set for every
    # metric), drawn a chunk of replicates at a time.
    per_chunk = max(1, _CELLS // prompts)
    orders = np.concatenate(
        [
            # a copy: a view of the prefix would keep each whole permutation alive
            rng.permuted(np.tile(np.arange(prompts), (count, 1)), axis=1)[:, :prefix].copy()
            for count in _chunks(replicates if prefix else 0, per_chunk)
        ]
        or [np.zeros((0, prefix), dtype=np.int64)]
    )
    full, agree, tau = {}, {}, {}
    per_chunk = max(1, _CELLS // max(1, prefix * teachers))
    for metric in HIGHER_IS_BETTER:
        parts = _parts(table, metric)
        full[metric] = _order(*_sums(parts, None), metric)
        agree[metric], tau[metric] = [], []
        for start in range(0, len(orders), per_chunk):
            top, bottom = _sums(parts, orders[start : start + per_chunk])  # cumulative
            ranked = _order(top[:, drawn - 1], bottom[:, drawn - 1], metric)
            agree[metric].append((ranked == full[metric]).all(axis=-1))
            tau[metric].append(_kendall_tau(ranked, full[metric]))
    rows = []
    for metric in HIGHER_IS_BETTER:
        shares = [*np.concatenate(agree[metric]).mean(axis=0).tolist()] if len(drawn) else []
        taus = [*np.concatenate(tau[metric]).mean(axis=0).tolist()] if len(drawn) else []
        # The one subset of every prompt is the full set: its ranking is the full one.
        shares.append(1.0)
        taus.append(1.0)
        for n, share, kendall in zip(sizes, shares, taus):
            rows.append(
                {"metric": metric, "n_prompts": n, "agreement": share, "kendall_tau": kendall}
            )
    return pa.Table.from_pylist(rows, schema=TEACHER_STABILITY_SCHEMA)


def stable_from(curve: pa.Table, metric: str) -> int | None:
    """The smallest size drawn from which the metric's ranking agrees on ``STABLE_AGREEMENT``
    of subsets, there and at every larger size drawn (None: at no size drawn)."""
    rows = sorted(
        (n, a)
        for m, n, a in zip(
            curve["metric"].to_pylist(),
            curve["n_prompts"].to_pylist(),
            curve["agreement"].to_pylist(),
        )
        if m == metric
    )[:-1]  # the last is all the prompts
    stable = None
    for n, agreement in reversed(rows):
        if agreement < STABLE_AGREEMENT:
            break
        stable = n
    return stable


def stability_statement(curve: pa.Table, metric: str, teachers: int) -> str:
    """One sentence on whether the metric's ranking is settled by the prompts at hand."""
    sizes = [n for m, n in zip(curve["metric"].to_pylist(), curve["n_prompts"].to_pylist())
             if m == metric]  # fmt: skip
    if not sizes or teachers < 2:
        return f"the {metric} ranking has fewer than 2 teachers to order"
    have, stable = max(sizes), stable_from(curve, metric)
    if stable is not None:
        return (
            f"the {metric} ranking of these {teachers} teachers is stable from {stable:,} "
            f"prompts ({STABLE_AGREEMENT:.0%} of random subsets give the full ranking); "
            f"you have {have:,}"
        )
    largest = max([n for n in sizes if n < have], default=0)
    unsettled = (
        f"the {metric} ranking of these {teachers} teachers is not settled: random subsets of "
        f"{largest:,} of your {have:,} prompts order them differently more than "
        f"{1 - STABLE_AGREEMENT:.0%} of the time"
    )
    if largest < have // 2:  # subsets stopped at MAX_SUBSET
        return f"{unsettled}; some of them may be too close to tell apart on this metric"
    return f"{unsettled}; gather more prompts"


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


def _parts(table: PromptTable, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt's numerator and denominator per teacher (``[prompts x teachers]``,
    ``PromptTable.ratio_parts``), zero where the teacher has no value."""
    top, bottom = table.ratio_parts(metric)
    keep = np.isfinite(top) & np.isfinite(bottom)
    return np.where(keep, top, 0.0), np.where(keep, bottom, 0.0)


def _sums(parts: tuple[np.ndarray, np.ndarray], order: np.ndarray | None):
    """Each teacher's numerator and denominator: over all prompts (``order`` None, shape
    ``[teachers]``), or cumulative along each permutation prefix in ``order`` (``[r x n x
    teachers]``)."""
    top, bottom = parts
    if order is None:
        return top.sum(axis=0), bottom.sum(axis=0)
    return np.cumsum(top[order], axis=1), np.cumsum(bottom[order], axis=1)


def _order(top: np.ndarray, bottom: np.ndarray, metric: str) -> np.ndarray:
    """Each teacher's rank position (0 = best) along the last axis; a teacher without values
    ranks last, and ties go by name (teachers are in name order)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        value = top / bottom
    key = -value if HIGHER_IS_BETTER[metric] else value
    key = np.where(np.isfinite(key), key, np.inf)
    ranking = np.argsort(key, axis=-1, kind="stable")
    return np.argsort(ranking, axis=-1, kind="stable")


def _kendall_tau(ranks: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Kendall's tau between each row of ``ranks`` and ``full`` (rank positions, no ties)."""
    teachers = full.shape[-1]
    if teachers < 2:
        return np.ones(ranks.shape[:-1])
    a, b = np.triu_indices(teachers, k=1)
    agree = np.sign(ranks[..., a] - ranks[..., b]) * np.sign(full[a] - full[b])
    return agree.mean(axis=-1)
