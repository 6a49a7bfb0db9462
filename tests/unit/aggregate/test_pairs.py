"""Paired teacher comparisons (ln_ray/aggregate/pairs.py) against plain loops over prompts."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from ln_ray.aggregate import pairs as pairs_module
from ln_ray.aggregate.pairs import (
    HIGHER_IS_BETTER,
    merge_prompt_sums,
    paired_comparisons,
    prompt_sums,
    prompt_table,
)
from ln_ray.aggregate.stability import (
    ranking_stability,
    stability_statement,
)
from ln_ray.aggregate.teachers import teacher_stats
from tests.helpers import TRACE_METRICS, difficulty_corpus, metric_trace, scores_table


def loop_means(scores: pa.Table, metric: str) -> dict[tuple[str, str], float]:
    """(prompt, teacher) -> mean of the metric's finite values, with a loop."""
    sums: dict = {}
    for row in scores.to_pylist():
        value = row[metric]
        if value is not None and math.isfinite(value):
            key = (row["prompt_id"], row["teacher"])
            total, count = sums.get(key, (0.0, 0))
            sums[key] = (total + value, count + 1)
    return {key: total / count for key, (total, count) in sums.items()}


def test_prompt_table_matches_a_loop_and_blocks_merge():
    rows = [
        metric_trace("p1", "a", 1.0),
        metric_trace("p1", "a", 3.0),
        metric_trace("p1", "b", float("nan")),
        metric_trace("p2", "b", -2.0),
        metric_trace("p2", "a", 0.5),
    ]
    scores = scores_table(rows)
    table = prompt_table(scores)
    assert list(table.prompts) == ["p1", "p2"] and table.teachers == ["a", "b"]
    for metric in TRACE_METRICS:
        expected = loop_means(scores, metric)
        for i, prompt in enumerate(table.prompts):
            for j, teacher in enumerate(table.teachers):
                got = table.values[metric][i, j]
                if (prompt, teacher) in expected:
                    assert got == pytest.approx(expected[(prompt, teacher)])
                else:
                    assert math.isnan(got)
    halves = pa.concat_tables([prompt_sums(scores.slice(0, 2)), prompt_sums(scores.slice(2))])
    merged = merge_prompt_sums(halves)
    for metric in TRACE_METRICS:
        np.testing.assert_allclose(merged.values[metric], table.values[metric], equal_nan=True)


def test_a_paired_difference_separates_what_independent_intervals_do_not():
    scores = difficulty_corpus()
    frame = scores.to_pandas()
    stats = {
        teacher: teacher_stats(group, samples=500, confidence=0.95, seed=0).set_index("metric")
        for teacher, group in frame.groupby("teacher")
    }
    a, b = stats["a"].loc["lalp"], stats["b"].loc["lalp"]
    assert a["ci_low"] < b["ci_high"] and b["ci_low"] < a["ci_high"]  # they overlap
    result = paired_comparisons(prompt_table(scores), samples=500, confidence=0.95, seed=0)
    row = result.filter(
        pa.compute.and_(
            pa.compute.equal(result["metric"], "lalp"), pa.compute.equal(result["teacher_a"], "a")
        )
    ).to_pylist()[0]
    assert row["separated"] and row["ci_low"] > 0.2 and row["win_rate"] == 1.0
    assert row["n_prompts"] == 30 and row["mean_diff"] == pytest.approx(0.3, abs=0.02)


def pair_parts(table, metric: str, a: int, b: int, p: int) -> tuple[float, ...]:
    """A's numerator and denominator on prompt p, then B's (a mean's denominator is 1)."""
    if metric == "rsr_dataset":
        rank, surprisal = table.values["rsr_rank"], table.values["rsr_surprisal"]
        return rank[p, a], surprisal[p, a], rank[p, b], surprisal[p, b]
    return table.values[metric][p, a], 1.0, table.values[metric][p, b], 1.0


def loop_estimate(table, metric: str, a: int, b: int, indices, shared: set) -> float:
    ta = sa = tb = sb = 0.0
    for p in indices:
        if p in shared:
            x = pair_parts(table, metric, a, b, p)
            ta, sa, tb, sb = ta + x[0], sa + x[1], tb + x[2], sb + x[3]
    return ta / sa - tb / sb if sa and sb else float("nan")


def independent_pairs(table, samples: int, confidence: float, seed: int) -> dict:
    """The same comparisons by plain loops: per pair, per resample, per prompt."""
    rng = np.random.default_rng([seed, pairs_module.stable_hash("pairs")])
    prompts = len(table.prompts)
    draws = rng.integers(0, prompts, size=(samples, prompts))  # one chunk at this size
    out = {}
    teachers = table.teachers
    for metric in HIGHER_IS_BETTER:
        for a in range(len(teachers)):
            for b in range(a + 1, len(teachers)):
                shared = {
                    p
                    for p in range(prompts)
                    if all(math.isfinite(v) for v in pair_parts(table, metric, a, b, p))
                }
                if not shared:
                    continue
                boot = [
                    loop_estimate(table, metric, a, b, draws[s], shared) for s in range(samples)
                ]
                alpha = (1 - confidence) / 2
                low, high = np.nanquantile(boot, [alpha, 1 - alpha])
                wins = 0.0
                for p in shared:
                    x = pair_parts(table, metric, a, b, p)
                    va, vb = x[0] / x[1], x[2] / x[3]
                    better = va > vb if HIGHER_IS_BETTER[metric] else va < vb
                    wins += 1.0 if better else 0.5 if va == vb else 0.0
                out[(metric, teachers[a], teachers[b])] = {
                    "mean_diff": loop_estimate(table, metric, a, b, range(prompts), shared),
                    "ci_low": low,
                    "ci_high": high,
                    "win_rate": wins / len(shared),
                    "n_prompts": len(shared),
                }
    return out


def test_paired_comparisons_match_loops_with_partly_disjoint_prompts():
    rng = np.random.default_rng(3)
    rows = []
    for p in range(40):
        base = rng.normal(0, 2)
        for teacher, shift in (("x", 0.0), ("y", 0.4), ("z", -0.2)):
            if teacher == "z" and p % 3 == 0:
                continue  # z answered only some prompts
            if teacher == "y" and p >= 30:
                continue
            for _ in range(1 + (p % 2)):  # some prompts have two samples
                rows.append(metric_trace(f"q{p:02d}", teacher, base + shift + rng.normal(0, 0.3)))
    scores = scores_table(rows)
    table = prompt_table(scores)
    result = paired_comparisons(table, samples=200, confidence=0.9, seed=7)
    expected = independent_pairs(table, samples=200, confidence=0.9, seed=7)
    got = {(r["metric"], r["teacher_a"], r["teacher_b"]): r for r in result.to_pylist()}
    assert len(got) == 2 * len(expected)
    for key, want in expected.items():
        row = got[key]
        for name in ("mean_diff", "ci_low", "ci_high", "win_rate"):
            assert row[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12), (key, name)
        assert row["n_prompts"] == want["n_prompts"]
        assert row["separated"] == (want["ci_low"] > 0 or want["ci_high"] < 0)
        mirror = got[(key[0], key[2], key[1])]
        assert mirror["mean_diff"] == pytest.approx(-row["mean_diff"])
        assert mirror["ci_low"] == pytest.approx(-row["ci_high"])
        assert mirror["win_rate"] == pytest.approx(1 - row["win_rate"])
    assert got[("lalp", "x", "z")]["n_prompts"] == 40 - 14  # only the prompts both answered
    assert got[("lalp", "y", "z")]["n_prompts"] == 30 - 10


def test_results_do_not_depend_on_input_order():
    rng = np.random.default_rng(0)
    rows = difficulty_corpus(20).to_pylist()
    for p in range(20):  # several traces of a teacher on a prompt, of very different sizes
        for _ in range(5):
            rows.append(
                metric_trace(f"p{p:03d}", "c", float(rng.normal() * 10.0 ** rng.integers(-5, 16)))
            )
    scores = scores_table(rows)
    shuffled = scores.take(np.random.default_rng(1).permutation(scores.num_rows))
    one = paired_comparisons(prompt_table(scores), samples=100, confidence=0.95, seed=2)
    two = paired_comparisons(prompt_table(shuffled), samples=100, confidence=0.95, seed=2)
    assert one.equals(two)
    curve_one = ranking_stability(prompt_table(scores), replicates=20, seed=2)
    assert curve_one.equals(ranking_stability(prompt_table(shuffled), replicates=20, seed=2))


def test_many_prompts_are_resampled_in_groups(monkeypatch):
    monkeypatch.setattr(pairs_module, "MAX_GROUPS", 8)
    scores = difficulty_corpus(50)
    result = paired_comparisons(prompt_table(scores), samples=300, confidence=0.95, seed=0)
    row = [r for r in result.to_pylist() if r["metric"] == "lalp" and r["teacher_a"] == "a"][0]
    assert row["n_prompts"] == 50 and row["separated"]
    assert row["ci_low"] < row["mean_diff"] < row["ci_high"]


def test_a_single_prompt_or_teacher_is_handled():
    one_teacher = prompt_table(
        scores_table([metric_trace("p", "a", 1.0), metric_trace("q", "a", 2.0)])
    )
    assert paired_comparisons(one_teacher, samples=50, confidence=0.95, seed=0).num_rows == 0
    curve = ranking_stability(one_teacher, replicates=10, seed=0)
    assert set(curve["agreement"].to_pylist()) == {1.0}
    assert "fewer than 2 teachers" in stability_statement(curve, "lalp", 1)
    one_prompt = prompt_table(
        scores_table([metric_trace("p", "a", 1.0), metric_trace("p", "b", 2.0)])
    )
    result = paired_comparisons(one_prompt, samples=50, confidence=0.95, seed=0)
    row = [r for r in result.to_pylist() if r["metric"] == "lalp" and r["teacher_a"] == "b"][0]
    assert row["n_prompts"] == 1 and row["win_rate"] == 1.0 and row["mean_diff"] == 1.0
    assert ranking_stability(one_prompt, replicates=10, seed=0)["n_prompts"].to_pylist()[0] == 1
