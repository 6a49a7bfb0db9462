"""Paired teacher comparisons and the ranking's stability, against plain loops over prompts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
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
    stable_from,
    subset_sizes,
)
from ln_ray.aggregate.teachers import count_wins, rank_teachers, teacher_stats

METRICS = ["lalp", "galp", "lalp_token", "rsr", "avg_rank", "avg_surprisal"]


def scores_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"trace_id": f"t{i}", **row} for i, row in enumerate(rows)],
    )


def trace(prompt: str, teacher: str, value: float, **extra) -> dict:
    """A trace whose every metric is ``value`` (ranks and surprisals kept positive)."""
    row = {m: value for m in METRICS}
    row.update(avg_rank=abs(value) + 1.0, avg_surprisal=abs(value) + 2.0)
    row.update(prompt_id=prompt, teacher=teacher, **extra)
    return row


def difficulty_corpus(prompts: int = 30, seed: int = 0) -> pa.Table:
    """Teacher "a" is 0.3 better than "b" on every prompt, prompts differ by several units."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(prompts):
        base = rng.normal(0, 5)
        rows.append(trace(f"p{p:03d}", "a", base + 0.3 + rng.normal(0, 0.02)))
        rows.append(trace(f"p{p:03d}", "b", base + rng.normal(0, 0.02)))
    return scores_table(rows)


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
        trace("p1", "a", 1.0),
        trace("p1", "a", 3.0),
        trace("p1", "b", float("nan")),
        trace("p2", "b", -2.0),
        trace("p2", "a", 0.5),
    ]
    scores = scores_table(rows)
    table = prompt_table(scores)
    assert list(table.prompts) == ["p1", "p2"] and table.teachers == ["a", "b"]
    for metric in METRICS:
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
    for metric in METRICS:
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
                rows.append(trace(f"q{p:02d}", teacher, base + shift + rng.normal(0, 0.3)))
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
            rows.append(trace(f"p{p:03d}", "c", float(rng.normal() * 10.0 ** rng.integers(-5, 16))))
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
    one_teacher = prompt_table(scores_table([trace("p", "a", 1.0), trace("q", "a", 2.0)]))
    assert paired_comparisons(one_teacher, samples=50, confidence=0.95, seed=0).num_rows == 0
    curve = ranking_stability(one_teacher, replicates=10, seed=0)
    assert set(curve["agreement"].to_pylist()) == {1.0}
    assert "fewer than 2 teachers" in stability_statement(curve, "lalp", 1)
    one_prompt = prompt_table(scores_table([trace("p", "a", 1.0), trace("p", "b", 2.0)]))
    result = paired_comparisons(one_prompt, samples=50, confidence=0.95, seed=0)
    row = [r for r in result.to_pylist() if r["metric"] == "lalp" and r["teacher_a"] == "b"][0]
    assert row["n_prompts"] == 1 and row["win_rate"] == 1.0 and row["mean_diff"] == 1.0
    assert ranking_stability(one_prompt, replicates=10, seed=0)["n_prompts"].to_pylist()[0] == 1


def test_the_teacher_table_says_who_is_separated_from_the_next():
    frame = difficulty_corpus().to_pandas()
    stats = pd.concat(
        teacher_stats(group, samples=200, confidence=0.95, seed=0)
        for _, group in frame.groupby("teacher")
    )
    pairs = paired_comparisons(
        prompt_table(difficulty_corpus()), samples=200, confidence=0.95, seed=0
    ).to_pandas()
    wins = count_wins(pd.DataFrame({"metric": ["lalp"], "teacher": ["a"], "trace_id": ["x"]}))
    table = rank_teachers(stats, wins, pairs).set_index(["metric", "teacher"])
    assert set(table.index.get_level_values("metric")) == set(HIGHER_IS_BETTER)
    assert table.loc[("lalp", "a"), "rank"] == 1 and table.loc[("lalp", "a"), "better"] == "higher"
    assert table.loc[("lalp", "a"), "separated_from_next"]
    assert pd.isna(table.loc[("lalp", "b"), "separated_from_next"])  # the last has no next
    assert table.loc[("avg_rank", "b"), "better"] == "lower"
    assert pd.isna(table.loc[("avg_rank", "a"), "wins"])  # no selection is made on it
    assert table.loc[("lalp", "a"), "wins"] == 1 and table.loc[("rsr", "a"), "wins"] == 0


def test_stability_matches_loops_and_reaches_one_at_all_prompts():
    scores = difficulty_corpus(30)
    rows = scores.to_pylist()
    rng = np.random.default_rng(5)
    for p in range(30):  # a third teacher close to "b": its order against "b" is unsettled
        rows.append(trace(f"p{p:03d}", "c", rows[2 * p + 1]["lalp"] + rng.normal(0, 0.3)))
    table = prompt_table(scores_table(rows))
    curve = ranking_stability(table, replicates=40, seed=9)
    sizes = subset_sizes(30)
    assert curve.num_rows == len(sizes) * len(HIGHER_IS_BETTER)
    perms = np.random.default_rng([9, pairs_module.stable_hash("stability")]).permuted(
        np.tile(np.arange(30), (40, 1)), axis=1
    )  # one chunk at this size

    def ranking(indices, metric):
        means = []
        for t in range(3):
            if metric == "rsr_dataset":
                top = sum(table.values["rsr_rank"][p, t] for p in indices)
                bottom = sum(table.values["rsr_surprisal"][p, t] for p in indices)
                means.append(top / bottom)
            else:
                means.append(np.mean([table.values[metric][p, t] for p in indices]))
        sign = -1 if HIGHER_IS_BETTER[metric] else 1
        return sorted(range(3), key=lambda t: (sign * means[t], table.teachers[t]))

    frame = curve.to_pandas()
    for metric in HIGHER_IS_BETTER:
        full = ranking(range(30), metric)
        for n in sizes:
            same, taus = 0, []
            for r in range(40):
                order = ranking(perms[r, :n], metric)
                same += order == full
                position = {t: i for i, t in enumerate(order)}
                concordant = [
                    np.sign(position[x] - position[y]) * np.sign(full.index(x) - full.index(y))
                    for x in range(3)
                    for y in range(x + 1, 3)
                ]
                taus.append(np.mean(concordant))
            row = frame[(frame["metric"] == metric) & (frame["n_prompts"] == n)].iloc[0]
            assert row["agreement"] == pytest.approx(same / 40)
            assert row["kendall_tau"] == pytest.approx(np.mean(taus))
        assert (
            frame[(frame["metric"] == metric) & (frame["n_prompts"] == 30)].iloc[0]["agreement"]
            == 1.0
        )
    assert sizes == [5, 9, 15, 30]  # drawn up to half the prompts, then all of them
    stable = stable_from(curve, "lalp")
    statement = stability_statement(curve, "lalp", 3)
    assert "lalp ranking of these 3 teachers" in statement and "30" in statement
    assert ("not settled" in statement) == (stable is None)
    # settled when half the prompts already agree: a, then b and c far apart, from 5 prompts
    clear = [trace(f"p{p:03d}", t, 3.0 * k + 0.01 * p) for p in range(40) for k, t in
             enumerate("abc")]  # fmt: skip
    settled = ranking_stability(prompt_table(scores_table(clear)), replicates=20, seed=0)
    assert stable_from(settled, "lalp") == 5
    expected = "stable from 5 prompts (95% of random subsets give the full ranking); you have 40"
    assert stability_statement(settled, "lalp", 3).endswith(expected)
    rng = np.random.default_rng(4)
    noisy = [trace(f"p{p:03d}", t, rng.normal(0.05 * k, 1.0)) for p in range(40) for k, t in
             enumerate("ab")]  # fmt: skip
    unsettled = ranking_stability(prompt_table(scores_table(noisy)), replicates=50, seed=0)
    assert "is not settled" in stability_statement(unsettled, "lalp", 2)


def test_subset_sizes_grow_to_half_the_prompts_then_all():
    assert subset_sizes(1) == [1]
    assert subset_sizes(7) == [3, 7]
    assert subset_sizes(12) == [5, 6, 12]
    sizes = subset_sizes(1000)
    assert sizes[0] == 5 and sizes[-2] == 500 and sizes[-1] == 1000
    assert subset_sizes(10**7)[-2] == 20_000
    assert pd.Series(sizes).diff().dropna().gt(0).all()
