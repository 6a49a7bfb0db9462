"""Window planning (ln_ray/score/windows.py): which sequences the local pass runs, and which tokens
reuse the global pass."""

import numpy as np
import pytest

from ln_ray.score.windows import WindowSpan, context_starts, plan_windows


def test_context_starts_fixed_window():
    assert context_starts(7, 2).tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert context_starts(3, 0).tolist() == [0, 1, 2]
    assert context_starts(0, 4).tolist() == []


def test_context_starts_fraction_of_preceding_steps():
    # step i (0-based) sees ceil(f * i) preceding steps
    assert context_starts(6, 99, fraction=0.5).tolist() == [0, 0, 1, 1, 2, 2]
    assert context_starts(5, 99, fraction=1.0).tolist() == [0, 0, 0, 0, 0]
    # 0.1 * 10 is 1.0000000000000002 in floating point: still one step, not two
    assert context_starts(11, 99, fraction=0.1)[10] == 9


def test_first_k_plus_one_steps_reuse_the_global_sequence():
    bounds = np.array([0, 3, 5, 9, 10, 14])  # five steps
    reused, spans = plan_windows(bounds, window=2, global_tokens=14)
    assert reused == 9  # steps 0..2 see context from step 0: prefixes of the global sequence
    assert spans == [WindowSpan(3, 9, 10), WindowSpan(5, 10, 14)]


def test_every_token_scored_exactly_once():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        bounds = np.concatenate([[0], np.cumsum(rng.integers(0, 5, size=n))])
        total = int(bounds[-1])
        window = int(rng.integers(0, 5))
        fraction = None if rng.random() < 0.5 else float(rng.uniform(0.05, 1.0))
        covered = int(rng.integers(0, total + 1))
        max_length = None if rng.random() < 0.5 else int(rng.integers(-2, total + 2))
        reused, spans = plan_windows(bounds, window, fraction, covered, max_length)
        seen = np.zeros(total, dtype=int)
        seen[:reused] += 1
        for span in spans:
            assert span.context_start <= span.score_start < span.stop
            seen[span.score_start : span.stop] += 1
        assert (seen == 1).all()
        if max_length is not None:
            # A window past max_length is exactly its step's, and nothing past it is reused.
            starts = context_starts(n, window, fraction)
            own = bounds[1:] - bounds[starts]
            step_of = np.searchsorted(bounds, np.arange(total), side="right") - 1
            assert (own[step_of[:reused]] <= max_length).all()
            for span in spans:
                if span.length > max_length:
                    i = step_of[span.score_start]
                    assert span.context_start == bounds[starts[i]]
                    assert (span.score_start, span.stop) == (bounds[i], bounds[i + 1])


def test_window_context_matches_definition():
    bounds = np.array([0, 2, 4, 7, 8, 12, 15])
    starts = context_starts(6, 1)
    _, spans = plan_windows(bounds, window=1, global_tokens=0)
    for span in spans:
        # every scored token's step starts its context exactly where the span does
        steps = np.searchsorted(bounds, np.arange(span.score_start, span.stop), side="right") - 1
        assert all(bounds[starts[s]] == span.context_start for s in steps)


def test_truncated_global_pass_leaves_early_steps_to_windows():
    bounds = np.array([0, 4, 8, 12])
    reused, spans = plan_windows(bounds, window=4, global_tokens=6)
    assert reused == 6
    assert spans == [WindowSpan(0, 6, 12)]


@pytest.mark.parametrize("window", [0, 1, 3])
def test_empty_steps_produce_no_spans(window):
    bounds = np.array([0, 0, 3, 3, 5])
    reused, spans = plan_windows(bounds, window=window, global_tokens=5)
    assert all(span.stop > span.score_start for span in spans)


def test_windows_past_max_length_run_alone_as_exactly_their_step():
    bounds = np.array([0, 3, 5, 9, 10, 14])  # five steps; with k = 2, windows of 3, 5, 9, 7, 9
    reused, spans = plan_windows(bounds, window=2, global_tokens=14, max_length=6)
    # Steps 0 and 1 still come from the global pass; step 2 (9 tokens with its context) does
    # not, and neither merges with nor extends any other window.
    assert reused == 5
    assert spans == [
        WindowSpan(0, 5, 9),
        WindowSpan(3, 9, 10),  # step 3: a 7-token window
        WindowSpan(5, 10, 14),
    ]
    # Without the limit: the plan of the first test.
    assert plan_windows(bounds, window=2, global_tokens=14) == (
        9,
        [WindowSpan(3, 9, 10), WindowSpan(5, 10, 14)],
    )
