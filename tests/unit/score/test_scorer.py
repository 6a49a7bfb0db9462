"""The scorer's bookkeeping (ln_ray/score/scorer.py): refusals, reject reasons, the global cap,
token counts and out-of-memory splits. Its scores are in tests/equivalence/test_scorer.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from ln_ray.score.scorer import StudentScorer
from ln_ray.score.vetting import StudentError
from tests.helpers import LONGROPE, make_tiny_causal_lm, make_traces


def test_longrope_student_needs_max_tokens_within_its_short_context(tiny_tokenizer):
    model = make_tiny_causal_lm("phi3", len(tiny_tokenizer), **LONGROPE)
    # The global cap defaults to the declared context (4096), past the switch to long factors.
    with pytest.raises(
        StudentError, match=r"set scoring.max_tokens <= 80 \(the global cap is 4096"
    ):
        StudentScorer(model)
    with pytest.raises(StudentError, match="max_tokens <= 80"):
        StudentScorer(model, max_tokens=81)
    assert StudentScorer(model, max_tokens=80).rope_limit == 80


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


def test_out_of_memory_splits_the_pack_and_keeps_results(tiny_tokenizer, tiny_pair, monkeypatch):
    import torch

    model, _ = tiny_pair
    traces = make_traces(tiny_tokenizer, count=6, seed=13)
    expected = StudentScorer(copy.deepcopy(model), window=1, token_budget=10**6).score(traces)
    scorer = StudentScorer(model, window=1, token_budget=10**6)
    forward = scorer.body.forward
    calls = {"oom": 0}
    longest = max(len(t.input_ids) for t in traces)  # every single sequence still fits

    def flaky_forward(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > longest:  # pretend longer packs do not fit
            calls["oom"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(scorer.body, "forward", flaky_forward)
    for a, b in zip(expected, scorer.score(traces), strict=True):
        np.testing.assert_allclose(a.local_logprobs, b.local_logprobs, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(a.global_ranks, b.global_ranks)
    assert calls["oom"] > 0
