"""Per-teacher statistics and the teacher table (ln_ray/aggregate/teachers.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ln_ray.aggregate.pairs import (
    HIGHER_IS_BETTER,
    paired_comparisons,
    prompt_table,
)
from ln_ray.aggregate.teachers import count_wins, rank_teachers, teacher_stats
from tests.helpers import difficulty_corpus


def _teacher(name, lalp, rank=None, surprisal=None):
    n = len(lalp)
    return pd.DataFrame(
        {
            "teacher": [name] * n,
            "lalp": lalp,
            "lalp_drop1": lalp,
            "galp": lalp,
            "lalp_token": lalp,
            "ifd": -np.asarray(lalp),
            "ifd_ppl": -np.asarray(lalp),
            "rsr": np.asarray(rank or [2.0] * n) / np.asarray(surprisal or [1.0] * n),
            "avg_rank": rank or [2.0] * n,
            "avg_surprisal": surprisal or [1.0] * n,
        }
    )


def test_teacher_stats_mean_ci_and_dataset_rsr():
    def stats_of(lalp, rank, surprisal):
        return teacher_stats(
            _teacher("a", lalp, rank=rank, surprisal=surprisal),
            samples=2000,
            confidence=0.9,
            seed=0,
        )

    stats = stats_of([-1.0, -2.0, -3.0, -2.0], [2, 4, 6, 8], [1, 1, 2, 4]).set_index("metric")
    assert stats.loc["lalp", "mean"] == pytest.approx(-2.0)
    assert stats.loc["lalp", "ci_low"] <= -2.0 <= stats.loc["lalp", "ci_high"]
    assert stats.loc["lalp", "ci_low"] >= -3.0 and stats.loc["lalp", "ci_high"] <= -1.0
    assert stats.loc["rsr_dataset", "mean"] == pytest.approx(20 / 8)
    assert stats.loc["rsr", "mean"] == pytest.approx(np.mean([2, 4, 3, 2]))
    assert (stats["count"] == 4).all()
    again = stats_of([-1.0, -2.0, -3.0, -2.0], [2, 4, 6, 8], [1, 1, 2, 4])
    pd.testing.assert_frame_equal(stats.reset_index()[again.columns], again)
    # the same rows in another order give the same intervals
    shuffled = stats_of([-2.0, -3.0, -1.0, -2.0], [8, 6, 2, 4], [4, 2, 1, 1])
    pd.testing.assert_frame_equal(stats.reset_index()[shuffled.columns], shuffled)


def test_rank_teachers_orders_by_direction_and_counts_wins():
    stats = pd.concat(
        [
            teacher_stats(
                _teacher("a", [-1.0, -1.2], rank=[9, 9]), samples=50, confidence=0.95, seed=1
            ),
            teacher_stats(
                _teacher("b", [-2.0, -2.2], rank=[1, 1]), samples=50, confidence=0.95, seed=1
            ),
        ]
    )
    selections = pd.DataFrame(
        {"metric": ["lalp", "lalp", "rsr"], "teacher": ["a", "a", "b"], "trace_id": ["x", "y", "z"]}
    )
    table = rank_teachers(stats, count_wins(selections)).set_index(["metric", "teacher"])
    assert table.loc[("lalp", "a"), "rank"] == 1 and table.loc[("lalp", "b"), "rank"] == 2
    assert table.loc[("rsr", "b"), "rank"] == 1  # lower is better
    assert table.loc[("lalp", "a"), "wins"] == 2 and table.loc[("lalp", "b"), "wins"] == 0
    assert table.loc[("rsr_dataset", "b"), "wins"] == 1


def test_a_metric_without_values_is_not_ranked():
    """IFD off (every trace NaN), and one teacher without lalp_drop1 values: no rank is made
    of NaNs."""
    a, b = _teacher("a", [-1.0, -1.2]), _teacher("b", [-2.0, -2.2])
    for frame in (a, b):
        frame["ifd"] = frame["ifd_ppl"] = np.nan
    b["lalp_drop1"] = np.nan
    stats = pd.concat([teacher_stats(t, samples=50, confidence=0.95, seed=1) for t in (a, b)])
    table = rank_teachers(stats, count_wins(pd.DataFrame(columns=["metric", "teacher"])))
    assert not {"ifd", "ifd_ppl"} & set(table["metric"])
    ranked = table[table["metric"] == "lalp_drop1"]
    assert ranked[["teacher", "rank"]].values.tolist() == [["a", 1]]
    assert (table["count"] > 0).all()


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
