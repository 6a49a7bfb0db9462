"""Scores in the student's generation view against the brute-force reference, for every template
family (tests/templates.py), on tiny random students and on SmolLM2."""

from __future__ import annotations

import copy

import pytest
import torch

from ln_ray.prepare.rows import prepare_row
from ln_ray.score.scorer import StudentScorer
from tests.helpers import make_tiny_llama
from tests.reference import assert_matches_reference, reference_scores
from tests.templates import (
    FAMILIES,
    MODES,
    REASONING,
    TRACES,
    scored_text,
    templated,
    trace_row,
    with_markers,
)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_metric_matches_the_reference_in_the_generation_view(marker_tokenizer, family):
    tokenizer = templated(marker_tokenizer, family)
    model = make_tiny_llama(len(tokenizer), seed=3)
    ref_model = copy.deepcopy(model)
    traces = [
        prepare_row(trace_row(text), tokenizer, reasoning=mode).tokens
        for text in TRACES.values()
        for mode in MODES.values()
    ]
    scorer = StudentScorer(model, window=1, token_budget=128)
    for trace, fast in zip(traces, scorer.score(traces), strict=True):
        assert fast.n_tokens == trace.n_response
        assert_matches_reference(fast, reference_scores(ref_model, trace, window=1))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_smollm2_scores_each_family_like_the_reference(smollm2, family):
    tokenizer = templated(with_markers(smollm2.tokenizer), family)
    reference = copy.deepcopy(smollm2.model)  # the session's model stays as loaded
    if len(tokenizer) > reference.get_input_embeddings().num_embeddings:
        reference.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = copy.deepcopy(reference)  # the scorer patches its own copy's attention
    short = f"<think>\n{REASONING.splitlines()[0]}\n</think>\n\nHe crosses once."
    prepared = prepare_row(trace_row(short), tokenizer)
    tokens = prepared.tokens
    assert tokenizer.decode(tokens.input_ids[tokens.prefix_len :]) == scored_text(family, short)
    (fast,) = StudentScorer(model, window=1, token_budget=256).score([tokens])
    with torch.no_grad():
        assert_matches_reference(fast, reference_scores(reference, tokens, window=1))
