"""Every family ln-ray covers (vetting.COVERED_MODEL_TYPES), proven against the brute-force
per-window reference (tests/reference.py) on a tiny random student: a window per step, traces
past the family's sliding window where it has one, packs of several sequences."""

from __future__ import annotations

import copy

import pytest

from ln_ray.prepare.render import unconditional_context
from ln_ray.score.planning import pack_sequences
from ln_ray.score.proof import longest_sliding_window
from ln_ray.score.scorer import StudentScorer
from ln_ray.score.vetting import COVERED_MODEL_TYPES
from tests.helpers import FAMILIES, make_tiny_causal_lm, make_traces
from tests.reference import assert_matches_reference, reference_scores


def test_the_covered_families_are_exactly_those_proven_here():
    assert set(FAMILIES) == COVERED_MODEL_TYPES


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_a_covered_family_matches_the_reference(tiny_tokenizer, model_type):
    model = make_tiny_causal_lm(model_type, len(tiny_tokenizer), **FAMILIES[model_type])
    reference = copy.deepcopy(model)  # untouched: transformers' own attention
    window = longest_sliding_window(model.config)
    assert window == FAMILIES[model_type].get("sliding_window")
    traces = make_traces(tiny_tokenizer, count=6, seed=1)
    if window is not None:  # prefixes, windows and traces all run past it
        assert min(t.prefix_len for t in traces) > window
        assert max(t.n_response for t in traces) > 4 * window
    unconditional = unconditional_context(tiny_tokenizer)
    scorer = StudentScorer(model, window=1, token_budget=96, unconditional=unconditional)
    plan = scorer.plan(traces)
    packs = pack_sequences(plan.window_sequences, 96, scorer.rope_limit)
    assert any(len(pack) > 1 for pack in packs)  # windows of several traces share packs
    for trace, fast in zip(traces, scorer.score(traces), strict=True):
        ref = reference_scores(reference, trace, window=1, unconditional=unconditional.tolist())
        assert_matches_reference(fast, ref)
