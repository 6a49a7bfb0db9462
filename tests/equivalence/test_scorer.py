"""The packed scorer against the brute-force per-window reference (tests/reference.py), on tiny
random students of several architectures and on SmolLM2, and its invariances."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from ln_ray.prepare.render import unconditional_context
from ln_ray.score.scorer import StudentScorer
from tests.helpers import LONGROPE, make_tiny_causal_lm, make_traces
from tests.reference import assert_matches_reference, reference_scores


@pytest.mark.parametrize(
    "window, fraction, max_tokens",
    [(4, None, 32768), (0, None, 32768), (1, None, 32768), (2, None, 60), (4, 0.5, 32768)],
)
def test_tiny_llama_matches_reference(tiny_tokenizer, tiny_pair, window, fraction, max_tokens):
    model, ref_model = tiny_pair
    traces = make_traces(tiny_tokenizer, count=6)
    unconditional = unconditional_context(tiny_tokenizer)
    scorer = StudentScorer(
        model,
        window=window,
        window_fraction=fraction,
        max_tokens=max_tokens,
        token_budget=96,
        unconditional=unconditional,
    )
    for trace, fast in zip(traces, scorer.score(traces), strict=True):
        ref = reference_scores(
            ref_model,
            trace,
            window=window,
            fraction=fraction,
            max_tokens=max_tokens,
            unconditional=unconditional.tolist(),
        )
        assert_matches_reference(fast, ref)
        # IFD wherever the global pass scored a token (a prompt that fills the cap: none)
        assert np.isfinite(fast.ifd) == np.isfinite(fast.ifd_ppl) == np.isfinite(fast.galp)


@pytest.mark.parametrize("context", ["bos", "none"])
def test_ifd_without_a_template_context_matches_reference(tiny_tokenizer, tiny_pair, context):
    """A template that refuses an empty user turn: the BOS token alone is the context; a
    tokenizer without one: no context, and the first response token leaves both means."""
    model, ref_model = tiny_pair
    traces = make_traces(tiny_tokenizer, count=4, seed=2)
    unconditional = (
        [tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")] if context == "bos" else []
    )
    scorer = StudentScorer(model, window=2, token_budget=96, unconditional=unconditional)
    plan = scorer.plan(traces)
    assert len(plan.unconditional_sequences) == len(traces)
    first = plan.unconditional_sequences[0]
    assert first.target_offset == (0 if unconditional else 1)
    for trace, fast in zip(traces, scorer.score(traces), strict=True):
        ref = reference_scores(ref_model, trace, window=2, unconditional=unconditional)
        assert_matches_reference(fast, ref)


@pytest.mark.parametrize("fraction", [None, 0.5])
def test_capped_longrope_student_matches_reference(tiny_tokenizer, fraction):
    model = make_tiny_causal_lm("phi3", len(tiny_tokenizer), **LONGROPE)
    ref_model = copy.deepcopy(model)
    traces = make_traces(tiny_tokenizer, count=6, seed=1)
    unconditional = unconditional_context(tiny_tokenizer)
    scorer = StudentScorer(
        model,
        window=1,
        window_fraction=fraction,
        max_tokens=80,
        token_budget=96,
        unconditional=unconditional,
    )
    # Some windows (prefix included) outgrow 80 tokens: the student reads them with long factors.
    assert any(
        not s.uses_prefix and len(s.tokens) > 80 for s in scorer.plan(traces).window_sequences
    )
    for trace, fast in zip(traces, scorer.score(traces), strict=True):
        ref = reference_scores(
            ref_model,
            trace,
            window=1,
            fraction=fraction,
            max_tokens=80,
            unconditional=unconditional.tolist(),
        )
        assert_matches_reference(fast, ref)


def test_window_covering_all_steps_equals_global(tiny_tokenizer, tiny_pair):
    model, _ = tiny_pair
    traces = make_traces(tiny_tokenizer, count=4, seed=3)
    scorer = StudentScorer(model, window=max(t.n_steps for t in traces), token_budget=64)
    for fast in scorer.score(traces):
        np.testing.assert_array_equal(fast.local_logprobs, fast.global_logprobs)
        assert fast.lalp_token == pytest.approx(fast.galp)


def test_results_do_not_depend_on_budget_or_batch_mates(tiny_tokenizer, tiny_pair):
    model, _ = tiny_pair
    traces = make_traces(tiny_tokenizer, count=8, seed=5)
    unconditional = unconditional_context(tiny_tokenizer)
    baseline = StudentScorer(
        model, window=2, token_budget=10**6, unconditional=unconditional
    ).score(traces)
    for budget in (16, 50, 200):
        scorer = StudentScorer(model, window=2, token_budget=budget, unconditional=unconditional)
        for a, b in zip(baseline, scorer.score(traces), strict=True):
            np.testing.assert_allclose(a.local_logprobs, b.local_logprobs, atol=1e-5, rtol=0)
            np.testing.assert_allclose(a.global_logprobs, b.global_logprobs, atol=1e-5, rtol=0)
            assert a.ifd == pytest.approx(b.ifd, abs=1e-5)
    # each trace alone, and the batch reversed, give the same scores
    scorer = StudentScorer(model, window=2, token_budget=128)
    alone = [scorer.score([t])[0] for t in traces]
    reversed_ = scorer.score(traces[::-1])[::-1]
    for a, b, c in zip(baseline, alone, reversed_, strict=True):
        np.testing.assert_allclose(a.local_logprobs, b.local_logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.local_logprobs, c.local_logprobs, atol=1e-5, rtol=0)
        assert a.lalp == pytest.approx(b.lalp, abs=1e-5)


def test_truncated_trace_still_scores_every_step_locally(tiny_tokenizer, tiny_pair):
    model, _ = tiny_pair
    trace = make_traces(tiny_tokenizer, count=1, seed=7)[0]
    scorer = StudentScorer(model, window=2, max_tokens=trace.prefix_len + 5, token_budget=64)
    result = scorer.score([trace])[0]
    assert result.truncated
    assert len(result.global_logprobs) == 5
    assert len(result.local_logprobs) == trace.n_response
    assert np.isfinite(result.local_logprobs).all()


@pytest.mark.slow
def test_smollm2_matches_reference(smollm2):
    from ln_ray.config import StudentConfig
    from ln_ray.score.student import load_student

    ref_model = load_student(StudentConfig(model="smollm2-135m")).model
    fast_model = copy.deepcopy(smollm2.model)
    traces = make_traces(smollm2.tokenizer, count=3, seed=2)
    unconditional = unconditional_context(smollm2.tokenizer)
    scorer = StudentScorer(fast_model, window=2, token_budget=256, unconditional=unconditional)
    for trace, fast in zip(traces, scorer.score(traces), strict=True):
        ref = reference_scores(ref_model, trace, window=2, unconditional=unconditional.tolist())
        assert_matches_reference(fast, ref)


def test_prompts_held_at_once_stay_within_the_prefix_budget(tiny_tokenizer, tiny_pair):
    """A batch whose prompts add up to more than compute.prefix_budget is scored a group at a
    time: no more prompt keys and values are held at once than the budget (a prompt longer than
    it, alone), and the scores are those of the whole batch."""
    from ln_ray.score.scorer import prefix_groups

    assert prefix_groups([5, 5, 5, 12, 3], 10) == [
        range(0, 2),
        range(2, 3),
        range(3, 4),
        range(4, 5),
    ]
    assert prefix_groups([], 10) == []
    model, _ = tiny_pair
    traces = make_traces(tiny_tokenizer, count=8, seed=6)
    baseline = StudentScorer(model, window=2).score(traces)
    budget = 2 * max(t.prefix_len for t in traces)
    scorer = StudentScorer(model, window=2, prefix_budget=budget)
    held, score_group = [], scorer._score_group

    def recording(batch):  # one group: its prompts' keys and values are held together
        held.append(sum(t.prefix_len for t in batch))
        return score_group(batch)

    scorer._score_group = recording
    for a, b in zip(baseline, scorer.score(traces), strict=True):
        np.testing.assert_allclose(a.local_logprobs, b.local_logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.global_logprobs, b.global_logprobs, atol=1e-5, rtol=0)
        assert (a.global_ranks == b.global_ranks).all()
    assert len(held) > 1 and max(held) <= budget
