"""The ranking's stability on prompt subsets (ln_ray/aggregate/stability.py) against loops."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ln_ray.aggregate import pairs as pairs_module
from ln_ray.aggregate.pairs import (
    HIGHER_IS_BETTER,
    prompt_table,
)
from ln_ray.aggregate.stability import (
    ranking_stability,
    stability_statement,
    stable_from,
    subset_sizes,
)
from tests.helpers import difficulty_corpus, metric_trace, scores_table


def test_stability_matches_loops_and_reaches_one_at_all_prompts():
    scores = difficulty_corpus(30)
    rows = scores.to_pylist()
    rng = np.random.default_rng(5)
    for p in range(30):  # a third teacher close to "b": its order against "b" is unsettled
        rows.append(metric_trace(f"p{p:03d}", "c", rows[2 * p + 1]["lalp"] + rng.normal(0, 0.3)))
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
    clear = [metric_trace(f"p{p:03d}", t, 3.0 * k + 0.01 * p) for p in range(40) for k, t in
             enumerate("abc")]  # fmt: skip
    settled = ranking_stability(prompt_table(scores_table(clear)), replicates=20, seed=0)
    assert stable_from(settled, "lalp") == 5
    expected = "stable from 5 prompts (95% of random subsets give the full ranking); you have 40"
    assert stability_statement(settled, "lalp", 3).endswith(expected)
    rng = np.random.default_rng(4)
    noisy = [metric_trace(f"p{p:03d}", t, rng.normal(0.05 * k, 1.0)) for p in range(40) for k, t in
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
