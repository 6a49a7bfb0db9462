"""The self-check every scoring actor runs before its first batch (ln_ray/score/proof.py): the
packed scorer against plain transformers forwards on a probe; a difference stops the job."""

from __future__ import annotations

import pytest
import torch

from ln_ray.score import scorer as scorer_module
from ln_ray.score import vetting
from ln_ray.score.proof import TOLERANCES, ProofError, probe_traces, prove_student
from ln_ray.score.scorer import StudentScorer
from ln_ray.score.vetting import StudentError
from tests.helpers import make_tiny_causal_lm, make_tiny_llama


def test_a_covered_student_passes_and_says_how_it_was_proven(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    scorer = StudentScorer(model, window=2, token_budget=128)
    tokens, seconds = scorer.model_tokens, dict(scorer.seconds)
    proof = prove_student(scorer, "tiny")
    assert proof.model_type == "llama" and proof.covered_by_tests
    assert proof.dtype == "float32" and proof.tolerance == TOLERANCES[torch.float32].largest
    assert 0 <= proof.max_difference < 1e-4 and proof.layers == 2
    assert (scorer.model_tokens, scorer.seconds) == (tokens, seconds)  # not counted as work


def test_the_probe_runs_past_the_longest_sliding_window_in_several_packs(tiny_tokenizer):
    model = make_tiny_causal_lm("mistral", len(tiny_tokenizer), sliding_window=8)
    scorer = StudentScorer(model, window=1, token_budget=64)
    proof = prove_student(scorer, "tiny mistral")
    assert proof.sliding_window == 8 and proof.covered_by_tests
    probe = probe_traces(len(tiny_tokenizer), 1, None, 8)
    plan = scorer.plan(probe)
    assert max(len(s.tokens) for s in plan.global_sequences) > 8
    assert max(len(s.tokens) for s in plan.window_sequences) > 8
    assert any(s.uses_prefix for s in plan.window_sequences)
    assert any(0 in bounds for bounds in (t.step_bounds[1:] - t.step_bounds[:-1] for t in probe))


def _shift_previous_position(module, inputs, output):
    previous = torch.zeros_like(output)
    previous[..., 1:, :] = inputs[0][..., :-1, :]
    return output + 0.5 * previous


def test_a_student_that_mixes_tokens_outside_attention_fails_naming_the_position(
    tiny_tokenizer,
):
    """Nothing in its config says so: only the numbers can tell."""
    model = make_tiny_llama(len(tiny_tokenizer))
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(_shift_previous_position)
    scorer = StudentScorer(model, window=2, token_budget=128)
    with pytest.raises(ProofError) as failed:
        prove_student(scorer, "leaky")
    message = str(failed.value)
    assert message.startswith("student 'leaky' failed its self-check: the ")
    assert "log-prob of probe trace" in message and "response token" in message
    assert "differs from a plain transformers forward by" in message
    assert "tolerance 0.001 in float32" in message


def test_layers_that_never_attend_fail_the_check(tiny_tokenizer, monkeypatch):
    """LFM2 with its refusal lifted: its convolution layers run no attention."""
    monkeypatch.setattr(scorer_module, "check_scorable", lambda config, cap: None)
    model = make_tiny_causal_lm("lfm2", len(tiny_tokenizer), full_attn_idxs=[1])
    scorer = StudentScorer(model, window=2, token_budget=128)
    with pytest.raises(ProofError, match=r"decoder layers \[0\] never ran attention"):
        prove_student(scorer, "lfm2")


def test_attention_sinks_are_refused_where_the_attention_receives_them(tiny_tokenizer, monkeypatch):
    """gpt-oss with its structural refusal lifted: the attention call itself refuses sinks."""
    monkeypatch.setattr(scorer_module, "check_structure", lambda model: None)
    model = make_tiny_causal_lm(
        "gpt_oss",
        len(tiny_tokenizer),
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )
    scorer = StudentScorer(model, window=2, token_budget=128)
    with pytest.raises(StudentError, match=r"attention sinks \(s_aux\)"):
        prove_student(scorer, "gpt-oss")
    with pytest.raises(StudentError, match="sinks"):
        vetting.check_structure(model)


def test_a_student_the_packed_path_cannot_even_run_fails_in_one_line(tiny_tokenizer, monkeypatch):
    """Llama-4 with its refusal lifted: its model returns no ``last_hidden_state``."""
    monkeypatch.setattr(scorer_module, "check_scorable", lambda config, cap: None)
    model = make_tiny_causal_lm(
        "llama4_text",
        len(tiny_tokenizer),
        attention_chunk_size=8,
        layer_types=["chunked_attention", "full_attention"],
    )
    scorer = StudentScorer(model, window=2, token_budget=128)
    with pytest.raises(ProofError, match="the packed path cannot score it") as failed:
        prove_student(scorer, "llama-4")
    assert "\n" not in str(failed.value)
