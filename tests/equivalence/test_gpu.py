"""The scorer on CUDA: fp32 matches the CPU reference; bf16 weights keep fp32 log-probs; bf16 packs
run as one FlashAttention varlen call and score like per-sequence attention; every covered family
passes the actors' self-check in bf16 with CUDA's kernels; the host does not wait for the GPU
between packs.

Skipped without a CUDA device (CI has none); run them on a GPU machine with ``pytest -m gpu``, or
with everything else the GPU path is measured by, ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from ln_ray.score import attention
from ln_ray.score.planning import pack_by_budget
from ln_ray.score.proof import TOLERANCES, prove_student
from ln_ray.score.scorer import StudentScorer
from ln_ray.score.transfer import to_device
from tests.helpers import FAMILIES, make_tiny_causal_lm, make_traces
from tests.reference import reference_scores

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_fp32_on_cuda_matches_the_cpu_reference(tiny_tokenizer, tiny_pair):
    model, ref_model = tiny_pair
    traces = make_traces(tiny_tokenizer, count=6, seed=21)
    scorer = StudentScorer(model.cuda(), window=2, token_budget=128)
    for trace, fast in zip(traces, scorer.score(traces), strict=True):
        ref = reference_scores(ref_model, trace, window=2)
        np.testing.assert_allclose(fast.local_logprobs, ref["local_logprobs"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(fast.global_logprobs, ref["global_logprobs"], atol=1e-4, rtol=0)
        assert np.mean(fast.global_ranks == ref["global_ranks"]) >= 0.99


def test_bf16_weights_score_in_fp32(tiny_tokenizer, tiny_pair):
    model, ref_model = tiny_pair
    traces = make_traces(tiny_tokenizer, count=4, seed=22)
    scorer = StudentScorer(copy.deepcopy(model).to("cuda", torch.bfloat16), window=2)
    assert scorer.head.weight.dtype == torch.float32  # logits, softmax and ranks in fp32
    for trace, fast in zip(traces, scorer.score(traces), strict=True):
        ref = reference_scores(ref_model, trace, window=2)
        assert fast.local_logprobs.dtype == np.float32
        assert np.isfinite(fast.local_logprobs).all()
        assert np.corrcoef(fast.local_logprobs, ref["local_logprobs"])[0, 1] > 0.99


def test_bf16_packs_run_as_one_varlen_call_like_per_sequence_attention(
    tiny_tokenizer, tiny_pair, monkeypatch
):
    if attention._torch_varlen() is None:
        pytest.skip("this torch has no FlashAttention varlen kernel with windows and GQA")
    model, _ = tiny_pair
    model = copy.deepcopy(model).to("cuda", torch.bfloat16)
    traces = make_traces(tiny_tokenizer, count=6, seed=23)
    chosen = []
    real = attention.varlen_kernel

    def recording(query):
        kernel = real(query)
        chosen.append(kernel is not None)
        return kernel

    monkeypatch.setattr(attention, "varlen_kernel", recording)
    varlen = StudentScorer(model, window=2, token_budget=64).score(traces)
    assert chosen and all(chosen)
    monkeypatch.setattr(attention, "varlen_kernel", lambda query: None)
    per_sequence = StudentScorer(model, window=2, token_budget=64).score(traces)
    for field in ("local_logprobs", "global_logprobs"):
        got = np.concatenate([getattr(r, field) for r in varlen])
        want = np.concatenate([getattr(r, field) for r in per_sequence])
        assert np.abs(got - want).mean() < 0.02  # two bf16 kernels: rounding, not a mask error
        assert np.corrcoef(got, want)[0, 1] > 0.999


def test_sliding_window_varlen_packs_score_like_the_reference(tiny_tokenizer):
    """FlashAttention's left window (W - 1) against the student's own banded masks."""
    if attention._torch_varlen() is None:
        pytest.skip("this torch has no FlashAttention varlen kernel with windows and GQA")
    model = make_tiny_causal_lm("mistral", len(tiny_tokenizer), sliding_window=8)
    ref_model = copy.deepcopy(model)
    traces = make_traces(tiny_tokenizer, count=6, seed=25)
    scorer = StudentScorer(model.to("cuda", torch.bfloat16), window=1, token_budget=64)
    got = np.concatenate([r.local_logprobs for r in scorer.score(traces)])
    want = np.concatenate(
        [reference_scores(ref_model, t, window=1)["local_logprobs"] for t in traces]
    )
    # bf16 against fp32 is rounding (on a CPU: mean 0.03, correlation 0.9998); a window off by
    # one token is not (mean 0.65 to 0.75, correlation 0.80 to 0.86).
    assert np.abs(got - want).mean() < 0.1
    assert np.corrcoef(got, want)[0, 1] > 0.99


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_bf16_students_pass_their_self_check_on_cuda(tiny_tokenizer, model_type):
    """The self-check's bf16 tolerances were set from CPU rounding noise (SDPA per segment); on a
    GPU the packed path runs FlashAttention varlen against the reference's SDPA, and a noise past
    the tolerances would stop every GPU run."""
    model = make_tiny_causal_lm(
        model_type, len(tiny_tokenizer), attn_implementation="sdpa", **FAMILIES[model_type]
    ).to("cuda", torch.bfloat16)
    proof = prove_student(StudentScorer(model, window=2), model_type)  # raises past them
    tolerance = TOLERANCES[torch.bfloat16]
    assert proof.max_difference <= tolerance.largest
    assert proof.mean_difference <= tolerance.mean


def test_to_device_copies_through_pinned_memory():
    data = np.arange(10, dtype=np.int64)
    tensor = to_device(data, torch.device("cuda"))
    assert tensor.device.type == "cuda"
    torch.testing.assert_close(tensor.cpu(), torch.from_numpy(data))


def test_a_pass_waits_for_the_gpu_once(tiny_tokenizer, tiny_pair):
    """No pack makes the host wait: results come back once per pass (log-probs, then ranks)."""
    model, _ = tiny_pair
    traces = make_traces(tiny_tokenizer, count=6, seed=24)
    model = copy.deepcopy(model).to("cuda", torch.bfloat16)
    scorer = StudentScorer(model, window=2, token_budget=64)
    windows = scorer.plan(traces).window_sequences
    packs = pack_by_budget([len(s.tokens) for s in windows], 64)
    assert len(packs) > 3  # more packs than allowed waits: a wait per pack would show
    scorer.score(traces)  # first calls set things up
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scorer.score(traces)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    waits = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(waits) <= 3, [str(w.message) for w in waits]
