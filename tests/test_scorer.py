"""The fast scorer against a brute-force reference, and its invariances."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from helpers import make_tiny_causal_lm, make_traces
from reference import assert_matches_reference, reference_scores

from ln_ray.score.scorer import StudentScorer
from ln_ray.score.vetting import StudentError


@pytest.mark.parametrize(
    "window, fraction, max_tokens",
    [(4, None, 32768), (0, None, 32768), (1, None, 32768), (2, None, 60), (4, 0.5, 32768)],
)
def test_tiny_llama_matches_reference(tiny_tokenizer, tiny_pair, window, fraction, max_tokens):
    model, ref_model = tiny_pair
    traces = make_traces(tiny_tokenizer, count=6)
    scorer = StudentScorer(
        model, window=window, window_fraction=fraction, max_tokens=max_tokens, token_budget=96
    )
    for trace, fast in zip(traces, scorer.score(traces), strict=True):
        ref = reference_scores(
            ref_model, trace, window=window, fraction=fraction, max_tokens=max_tokens
        )
        assert_matches_reference(fast, ref)


_SLIDING_STUDENTS = {
    "mistral": {"sliding_window": 8},
    # Gemma-3: local layers with a window, global layers without one (per layer type).
    "gemma3_text": {
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}


@pytest.mark.parametrize("model_type", sorted(_SLIDING_STUDENTS))
def test_sliding_window_students_match_reference(tiny_tokenizer, model_type):
    model = make_tiny_causal_lm(model_type, len(tiny_tokenizer), **_SLIDING_STUDENTS[model_type])
    ref_model = copy.deepcopy(model)
    traces = make_traces(tiny_tokenizer, count=6, seed=1)
    # Prefixes, windows and traces all run past the 8-token window.
    assert min(t.prefix_len for t in traces) > 8
    assert max(t.n_response for t in traces) > 4 * 8
    scorer = StudentScorer(model, window=1, token_budget=96)
    for trace, fast in zip(traces, scorer.score(traces), strict=True):
        assert_matches_reference(fast, reference_scores(ref_model, trace, window=1))


_SCALED_HEADS = {
    "granite": {"logits_scaling": 8.0},  # logits / 8
    "hyperclovax": {"logits_scaling": 0.25},  # logits * 0.25: the same name, another meaning
    "cohere": {"logit_scale": 0.5},  # logits * 0.5
}


@pytest.mark.parametrize("model_type", sorted(_SCALED_HEADS))
def test_scaled_output_heads_match_reference(tiny_tokenizer, model_type):
    model = make_tiny_causal_lm(model_type, len(tiny_tokenizer), **_SCALED_HEADS[model_type])
    ref_model = copy.deepcopy(model)
    traces = make_traces(tiny_tokenizer, count=3, seed=4)
    scorer = StudentScorer(model, window=1, token_budget=96)
    for trace, fast in zip(traces, scorer.score(traces), strict=True):
        assert_matches_reference(fast, reference_scores(ref_model, trace, window=1))


# Phi-3's longrope: long factors for any sequence longer than 80 tokens (4096 in Phi-3.5-mini).
_LONGROPE = {
    "rope_parameters": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * 8,
        "long_factor": [4.0] * 8,
        "original_max_position_embeddings": 80,
    },
    "original_max_position_embeddings": 80,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def test_longrope_student_needs_max_tokens_within_its_short_context(tiny_tokenizer):
    model = make_tiny_causal_lm("phi3", len(tiny_tokenizer), **_LONGROPE)
    # The global cap defaults to the declared context (4096), past the switch to long factors.
    with pytest.raises(
        StudentError, match=r"set scoring.max_tokens <= 80 \(the global cap is 4096"
    ):
        StudentScorer(model)
    with pytest.raises(StudentError, match="max_tokens <= 80"):
        StudentScorer(model, max_tokens=81)
    assert StudentScorer(model, max_tokens=80).rope_limit == 80


@pytest.mark.parametrize("fraction", [None, 0.5])
def test_capped_longrope_student_matches_reference(tiny_tokenizer, fraction):
    model = make_tiny_causal_lm("phi3", len(tiny_tokenizer), **_LONGROPE)
    ref_model = copy.deepcopy(model)
    traces = make_traces(tiny_tokenizer, count=6, seed=1)
    scorer = StudentScorer(
        model, window=1, window_fraction=fraction, max_tokens=80, token_budget=96
    )
    # Some windows (prefix included) outgrow 80 tokens: the student reads them with long factors.
    assert any(
        not s.uses_prefix and len(s.tokens) > 80 for s in scorer.plan(traces).window_sequences
    )
    for trace, fast in zip(traces, scorer.score(traces), strict=True):
        ref = reference_scores(ref_model, trace, window=1, fraction=fraction, max_tokens=80)
        assert_matches_reference(fast, ref)


@pytest.mark.parametrize(
    "model_type, overrides, reason",
    [
        ("gemma2", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
            "dynamic NTK",
        ),
    ],
)
def test_students_packed_scoring_cannot_reproduce_are_refused(
    tiny_tokenizer, model_type, overrides, reason
):
    model = make_tiny_causal_lm(model_type, len(tiny_tokenizer), **overrides)
    with pytest.raises(StudentError, match=reason):
        StudentScorer(model, max_tokens=64)


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
    baseline = StudentScorer(model, window=2, token_budget=10**6).score(traces)
    for budget in (16, 50, 200):
        scorer = StudentScorer(model, window=2, token_budget=budget)
        for a, b in zip(baseline, scorer.score(traces), strict=True):
            np.testing.assert_allclose(a.local_logprobs, b.local_logprobs, atol=1e-5, rtol=0)
            np.testing.assert_allclose(a.global_logprobs, b.global_logprobs, atol=1e-5, rtol=0)
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


def test_a_prompt_filling_the_global_cap_is_a_reject_reason(tiny_tokenizer, tiny_pair, caplog):
    model, _ = tiny_pair
    trace = make_traces(tiny_tokenizer, count=1, seed=7)[0]
    fits = StudentScorer(model, window=2, max_tokens=trace.prefix_len + 1, token_budget=64)
    assert fits.reject_reason(trace.prefix_len) is None
    full = StudentScorer(model, window=2, max_tokens=trace.prefix_len, token_budget=64)
    reason = full.reject_reason(trace.prefix_len)
    assert reason == f"prompt longer than scoring.max_tokens ({trace.prefix_len} tokens)"
    assert full.reject_reason(trace.prefix_len + 100) == reason  # one reason per run
    # Scored anyway, it has no global metrics, and says so.
    result = full.score([trace])[0]
    assert np.isnan(result.galp) and np.isnan(result.rsr)
    assert "no global scores" in caplog.text


def test_global_sequence_stops_at_the_students_declared_context(tiny_tokenizer, tiny_pair, caplog):
    model = copy.deepcopy(tiny_pair[0])
    trace = make_traces(tiny_tokenizer, count=1, seed=7)[0]
    model.config.max_position_embeddings = trace.prefix_len + 5
    capped = StudentScorer(model, window=2, token_budget=64).score([trace])[0]
    assert capped.truncated
    assert len(capped.global_logprobs) == 5
    assert np.isfinite(capped.local_logprobs).all()

    # An explicit cap past the context is the user's call: honoured, with a warning.
    explicit = StudentScorer(model, window=2, max_tokens=10**6, token_budget=64)
    assert "beyond the student's declared context" in caplog.text
    assert not explicit.score([trace])[0].truncated


def test_model_tokens_count_prefix_once_per_trace(tiny_tokenizer, tiny_pair):
    model, _ = tiny_pair
    traces = make_traces(tiny_tokenizer, count=3, seed=11)
    scorer = StudentScorer(model, window=1, token_budget=64)
    results = scorer.score(traces)
    assert scorer.model_tokens == sum(r.model_tokens for r in results)
    minimum = sum(t.prefix_len + t.n_response for t in traces)
    assert scorer.model_tokens >= minimum
    # windows re-run only response tokens: at most (k + 1) x response tokens on top of the prefix
    assert scorer.model_tokens <= sum(t.prefix_len + 3 * t.n_response for t in traces)


@pytest.mark.slow
def test_smollm2_matches_reference(smollm2):
    from ln_ray.config import StudentConfig
    from ln_ray.score.student import load_student

    ref_model = load_student(StudentConfig(model="smollm2-135m")).model
    fast_model = copy.deepcopy(smollm2.model)
    traces = make_traces(smollm2.tokenizer, count=3, seed=2)
    scorer = StudentScorer(fast_model, window=2, token_budget=256)
    for trace, fast in zip(traces, scorer.score(traces), strict=True):
        assert_matches_reference(fast, reference_scores(ref_model, trace, window=2))


def test_out_of_memory_splits_the_row_and_keeps_results(tiny_tokenizer, tiny_pair, monkeypatch):
    import torch

    model, _ = tiny_pair
    traces = make_traces(tiny_tokenizer, count=6, seed=13)
    expected = StudentScorer(copy.deepcopy(model), window=1, token_budget=10**6).score(traces)
    scorer = StudentScorer(model, window=1, token_budget=10**6)
    forward = scorer.body.forward
    calls = {"oom": 0}
    longest = max(len(t.input_ids) for t in traces)  # every single sequence still fits

    def flaky_forward(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > longest:  # pretend longer rows do not fit
            calls["oom"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(scorer.body, "forward", flaky_forward)
    for a, b in zip(expected, scorer.score(traces), strict=True):
        np.testing.assert_allclose(a.local_logprobs, b.local_logprobs, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(a.global_ranks, b.global_ranks)
    assert calls["oom"] > 0
