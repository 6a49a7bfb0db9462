"""Scoring plans (ln_ray/score/planning.py) on random token ids and step boundaries: what each kept
prediction sees, checked against the definitions (no model), and packing into token budgets."""

from __future__ import annotations

import numpy as np
import pytest

from ln_ray.prepare.render import TokenizedTrace
from ln_ray.score.planning import (
    ScoredSequence,
    pack_by_budget,
    pack_sequences,
    plan_scoring,
)
from ln_ray.score.windows import context_starts


def _random_traces(rng: np.random.Generator, n: int) -> list[TokenizedTrace]:
    traces = []
    for _ in range(n):
        prefix = int(rng.integers(1, 6))
        sizes = rng.integers(0, 6, size=int(rng.integers(1, 9)))  # steps may own no token
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        ids = rng.integers(0, 1000, size=prefix + int(bounds[-1])).astype(np.int64)
        traces.append(TokenizedTrace(ids, prefix, bounds))
    return traces


def _random_settings(rng: np.random.Generator) -> dict:
    return dict(
        window=int(rng.integers(0, 4)),
        window_fraction=None if rng.random() < 0.6 else float(rng.uniform(0.1, 1.0)),
        max_tokens=int(rng.integers(2, 40)),
        rope_limit=None if rng.random() < 0.6 else int(rng.integers(8, 30)),
        unconditional=None
        if rng.random() < 0.3
        else rng.integers(0, 1000, size=int(rng.integers(0, 4))).astype(np.int64),
    )


def _seen_by_each_target(seq: ScoredSequence, trace: TokenizedTrace) -> list[np.ndarray]:
    """The tokens the model has seen when it predicts each target: the sequence as run
    (recorded prefix first, when it uses one) up to and including the predicting position."""
    p = trace.prefix_len
    run = np.concatenate([trace.input_ids[:p], seq.tokens]) if seq.uses_prefix else seq.tokens
    if seq.first_predictor is None:
        assert seq.uses_prefix, "only a window on the recorded prefix predicts from it"
        first = p - 1
    else:
        first = (p if seq.uses_prefix else 0) + seq.first_predictor
    assert first >= 0
    for j, target in enumerate(seq.targets):
        assert run[first + j + 1] == target, "a target is not the token after its predictor"
    return [run[: first + j + 1] for j in range(len(seq.targets))]


@pytest.mark.parametrize("seed", range(40))
def test_every_kept_prediction_sees_exactly_its_definition(seed):
    rng = np.random.default_rng(seed)
    traces = _random_traces(rng, 4)
    settings = _random_settings(rng)
    plan = plan_scoring(traces, **settings)

    for i, trace in enumerate(traces):
        p, response = trace.prefix_len, trace.input_ids[trace.prefix_len :]
        prefix = trace.input_ids[:p]
        starts = context_starts(trace.n_steps, settings["window"], settings["window_fraction"])
        step_of = np.searchsorted(trace.step_bounds, np.arange(trace.n_response), "right") - 1

        # Global: prefix + every earlier response token, up to the cap.
        glob = plan.global_sequences[i]
        assert glob.trace == i and glob.is_global and not glob.uses_prefix
        assert plan.n_global[i] == max(0, min(trace.n_response, settings["max_tokens"] - p))
        assert len(glob.targets) == plan.n_global[i] and glob.target_offset == 0
        assert len(glob.tokens) == p + plan.n_global[i]  # the last position predicts nothing
        for j, seen in enumerate(_seen_by_each_target(glob, trace)):
            assert np.array_equal(seen, np.concatenate([prefix, response[:j]]))

        # Local: prefix + the window's steps + the step's earlier tokens, exactly once per token.
        window_start = trace.step_bounds[starts[step_of]]  # per response token
        scored = np.zeros(trace.n_response, dtype=int)
        for j in range(plan.reused[i]):  # reused from the global pass: its context is the window
            assert starts[step_of[j]] == 0
            scored[j] += 1
        windows = [s for s in plan.window_sequences if s.trace == i]
        for seq in windows:
            assert not seq.is_global and seq.records_prefix_len == 0
            seen_by = _seen_by_each_target(seq, trace)
            assert (
                len(seen_by[-1]) == (p if seq.uses_prefix else 0) + len(seq.tokens) - 1
            )  # ends on a target
            for j, seen in enumerate(seen_by, seq.target_offset):
                context = np.concatenate([prefix, response[window_start[j] : j]])
                assert np.array_equal(seen, context)
                scored[j] += 1
        assert (scored == 1).all()

        # Unconditional (IFD): the no-prompt context + every earlier response token, for the
        # global pass's tokens (as many as fit the cap after that context); with no context,
        # the first response token has no predictor and is left out.
        alone = [s for s in plan.unconditional_sequences if s.trace == i]
        context = settings["unconditional"]
        if context is None:
            assert alone == []
        else:
            n = max(0, min(plan.n_global[i], settings["max_tokens"] - len(context)))
            skip = 0 if len(context) else 1
            assert len(alone) == (1 if n > skip else 0)
            for seq in alone:
                assert seq.unconditional and not seq.is_global and not seq.uses_prefix
                assert seq.target_offset == skip and len(seq.targets) == n - skip
                for j, seen in enumerate(_seen_by_each_target(seq, trace), skip):
                    assert np.array_equal(seen, np.concatenate([context, response[:j]]))

        # The prefix is recorded when a window needs it, and the token count is what runs.
        if any(s.uses_prefix for s in windows):
            assert glob.records_prefix_len == p
        ran = [glob, *windows, *alone]
        assert plan.model_tokens[i] == sum(len(s.tokens) for s in ran)


def test_windows_past_the_rope_limit_carry_their_prefix_and_run_in_a_pack_alone():
    bounds = np.array([0, 3, 5, 14, 15], dtype=np.int64)  # step 2 is 9 tokens: 4 + 9 > 12
    trace = TokenizedTrace(np.arange(4 + 15, dtype=np.int64), 4, bounds)
    plan = plan_scoring([trace], window=0, window_fraction=None, max_tokens=12, rope_limit=12)
    long = [i for i, s in enumerate(plan.window_sequences) if not s.uses_prefix]
    assert len(long) == 1
    alone = plan.window_sequences[long[0]]
    assert alone.target_offset == 5 and len(alone.tokens) == 4 + 9
    assert np.array_equal(alone.tokens[:4], trace.input_ids[:4])  # its own copy of the prefix
    packs = pack_sequences(plan.window_sequences, token_budget=64, rope_limit=12)
    assert long in packs
    assert sorted(i for pack in packs for i in pack) == list(range(len(plan.window_sequences)))


def test_without_a_rope_limit_short_sequences_share_packs():
    traces = _random_traces(np.random.default_rng(1), 6)
    plan = plan_scoring(traces, window=1, window_fraction=None, max_tokens=64, rope_limit=None)
    packs = pack_sequences(plan.window_sequences, token_budget=1000, rope_limit=None)
    assert len(packs) == 1


def test_pack_longest_first_within_budget():
    lengths = [5, 40, 12, 30, 3, 8]
    packs = pack_by_budget(lengths, budget=45)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in pack) <= 45 for pack in packs)
    assert packs[0][0] == 1  # the longest sequence opens the first pack


def test_oversized_sequence_gets_its_own_pack():
    packs = pack_by_budget([100, 10, 10], budget=32)
    assert packs == [[0], [1, 2]]


def test_packing_is_deterministic_on_ties():
    assert pack_by_budget([4, 4, 4, 4], budget=8) == [[0, 1], [2, 3]]
