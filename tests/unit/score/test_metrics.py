"""Metric arithmetic (ln_ray/score/metrics.py) on hand-made numbers."""

import math

import numpy as np
import pytest

from ln_ray.score.metrics import trace_metrics


def test_metrics_by_hand():
    global_lp = np.array([-1.0, -2.0, -3.0, -2.0])
    ranks = np.array([1, 3, 250, 4])
    local_lp = np.array([-1.0, -3.0, -5.0, -1.0])
    bounds = np.array([0, 1, 1, 4])  # steps: [t0], [], [t1 t2 t3]
    m = trace_metrics(global_lp, ranks, local_lp, bounds, rank_clip=100)
    assert m["galp"] == pytest.approx(-2.0)
    assert m["avg_surprisal"] == pytest.approx(2.0)
    assert m["avg_rank"] == pytest.approx((1 + 3 + 100 + 4) / 4)
    assert m["rsr"] == pytest.approx(108 / 8)
    assert m["step_logprobs"] == [pytest.approx(-1.0), None, pytest.approx(-3.0)]
    assert m["lalp"] == pytest.approx(-2.0)  # every step weighs the same
    assert m["lalp_token"] == pytest.approx(-2.5)  # every token weighs the same
    # Without each step's first token: [t0] owns none and is skipped, [t1 t2 t3] is [t2 t3].
    assert m["lalp_drop1"] == pytest.approx(-3.0)


def test_lalp_drop1_leans_less_towards_long_steps():
    # Two teachers say the same: each step opens on an unlikely token (-6), the rest is
    # likely (-0.5). One writes steps of 2 tokens, the other of 8: LALP favours the long steps,
    # lalp_drop1 scores them alike.
    short = np.array([-6.0, -0.5] * 4)
    long = np.array([-6.0] + [-0.5] * 7)
    empty_global = (np.array([-1.0]), np.array([1]))
    m_short = trace_metrics(*empty_global, short, np.array([0, 2, 4, 6, 8]), 100)
    m_long = trace_metrics(*empty_global, long, np.array([0, 8]), 100)
    assert m_short["lalp"] == pytest.approx(-3.25) and m_long["lalp"] == pytest.approx(-1.1875)
    assert m_short["lalp_drop1"] == m_long["lalp_drop1"] == pytest.approx(-0.5)
    one_token_steps = trace_metrics(*empty_global, short[:2], np.array([0, 1, 2]), 100)
    assert math.isnan(one_token_steps["lalp_drop1"])  # no step keeps a token


def test_no_global_tokens_gives_nan_global_metrics():
    m = trace_metrics(
        np.array([]), np.array([], dtype=np.int64), np.array([-1.0]), np.array([0, 1]), 100
    )
    assert math.isnan(m["galp"]) and math.isnan(m["rsr"]) and math.isnan(m["avg_rank"])
    assert m["lalp"] == pytest.approx(-1.0)


def test_ifd_is_the_loss_ratio_and_ifd_ppl_the_perplexity_ratio():
    global_lp = np.array([-1.0, -2.0, -3.0, -2.0])  # s(A|Q) = 2 over all four tokens
    ranks, local, bounds = np.array([1, 1, 1, 1]), global_lp, np.array([0, 4])
    alone = np.array([-4.0, -4.0, -3.0, -5.0])  # s(A) = 4
    m = trace_metrics(global_lp, ranks, local, bounds, 100, (alone, 0))
    assert m["ifd"] == pytest.approx(2.0 / 4.0)
    assert m["ifd_ppl"] == pytest.approx(math.exp(2.0) / math.exp(4.0))
    # With no context the first token has no predictor: both means are over tokens 2..4.
    m = trace_metrics(global_lp, ranks, local, bounds, 100, (alone[1:], 1))
    assert m["ifd"] == pytest.approx((7 / 3) / 4.0)
    assert m["ifd_ppl"] == pytest.approx(math.exp(7 / 3 - 4.0))
    # The variants rank traces differently: the loss ratio weighs a trace's losses relative to
    # each other, the perplexity ratio their difference.
    easy = trace_metrics(
        -np.array([0.2]), ranks[:1], local[:1], np.array([0, 1]), 100, (-np.array([0.5]), 0)
    )
    hard = trace_metrics(
        -np.array([3.0]), ranks[:1], local[:1], np.array([0, 1]), 100, (-np.array([5.0]), 0)
    )
    assert easy["ifd"] < hard["ifd"] and easy["ifd_ppl"] > hard["ifd_ppl"]
    off = trace_metrics(global_lp, ranks, local, bounds, 100)
    assert math.isnan(off["ifd"]) and math.isnan(off["ifd_ppl"])
