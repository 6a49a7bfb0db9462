"""The packed row as one varlen attention call: its layout, and its scores against per-segment SDPA.

FlashAttention's varlen kernel runs only on CUDA. Here a reference with the kernel's contract
(queries and keys packed end to end, ``cu_seq`` offsets, causal mask aligned to the bottom right)
stands in for it, so the layout ln-ray builds around the kernel is checked on any machine.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from helpers import make_tiny_causal_lm, make_traces

from ln_ray.score import attention
from ln_ray.score.attention import Segment, varlen_index
from ln_ray.score.scorer import StudentScorer


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size, enable_gqa):
    """FlashAttention's varlen contract, one sequence at a time.

    ``window_size=(left, 0)``: query ``i`` sees keys ``i + n_k - n_q - left .. i + n_k - n_q``
    (``left = -1``: no lower bound).
    """
    left, right = window_size
    assert right == 0 and left >= -1
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)[None]
        ks = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1)[None]
        vs = v[cu_k[i] : cu_k[i + 1]].transpose(0, 1)[None]
        assert qs.shape[2] <= max_q and ks.shape[2] <= max_k
        n_q, n_k = qs.shape[2], ks.shape[2]
        # Query i sees keys up to i + n_k - n_q: causal, aligned to the bottom right.
        mask = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
        if left >= 0:
            mask = mask.triu(n_k - n_q - left)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=enable_gqa
        )
        out[cu_q[i] : cu_q[i + 1]] = o[0].transpose(0, 1)
    return out


def test_varlen_index_gathers_each_segments_prefix_then_itself():
    segments = [
        Segment(trace=0, start=0, length=3, records_prefix_len=2),  # a global sequence
        Segment(trace=1, start=3, length=2, uses_prefix=True),
        Segment(trace=0, start=5, length=2, uses_prefix=True),
    ]
    index = varlen_index(segments, {0: 4, 1: 2}, torch.device("cpu"))
    # Bank: trace 0's prefix at 0-3, trace 1's at 4-5; the row's own keys from 6 on.
    assert index.traces == [0, 1]
    assert index.gather.tolist() == [6, 7, 8, 4, 5, 9, 10, 0, 1, 2, 3, 11, 12]
    assert index.cu_q.tolist() == [0, 3, 5, 7]
    assert index.cu_k.tolist() == [0, 3, 7, 13]
    assert (index.max_q, index.max_k) == (3, 6)
    assert index.cu_q.dtype == index.cu_k.dtype == torch.int32


def test_one_varlen_call_per_row_gives_the_per_segment_scores(
    tiny_tokenizer, tiny_pair, monkeypatch
):
    model, _ = tiny_pair
    traces = make_traces(tiny_tokenizer, count=6, seed=11)
    expected = StudentScorer(model, window=2, token_budget=64).score(traces)

    calls = []

    def kernel(query):
        calls.append(query.shape[2])
        return reference_varlen

    monkeypatch.setattr(attention, "varlen_kernel", kernel)
    scorer = StudentScorer(model, window=2, token_budget=64)
    got = scorer.score(traces)
    layers = len(model.model.layers)
    # Every row, every layer: one call over all of the row's tokens (and there are several rows).
    assert len(calls) > layers and sum(calls) == scorer.model_tokens * layers
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(b.local_logprobs, a.local_logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(b.global_logprobs, a.global_logprobs, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(b.global_ranks, a.global_ranks)


def test_varlen_call_keeps_a_sliding_window(tiny_tokenizer, monkeypatch):
    model = make_tiny_causal_lm("mistral", len(tiny_tokenizer), sliding_window=8)
    traces = make_traces(tiny_tokenizer, count=6, seed=11)
    expected = StudentScorer(model, window=1, token_budget=64).score(traces)
    windows = []

    def kernel(query):
        def recording(*args, window_size, **kwargs):
            windows.append(window_size)
            return reference_varlen(*args, window_size=window_size, **kwargs)

        return recording

    monkeypatch.setattr(attention, "varlen_kernel", kernel)
    got = StudentScorer(model, window=1, token_budget=64).score(traces)
    assert set(windows) == {(7, 0)}  # FlashAttention's left window excludes the query itself
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(b.local_logprobs, a.local_logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(b.global_logprobs, a.global_logprobs, atol=1e-5, rtol=0)


def test_varlen_runs_only_where_flash_attention_does():
    assert attention.varlen_kernel(torch.zeros(1, 4, 8, 16)) is None  # CPU, fp32
    assert attention.varlen_kernel(torch.zeros(1, 4, 8, 16, dtype=torch.bfloat16)) is None


def test_the_kernel_that_scores_is_named_with_its_dtype(monkeypatch):
    model = make_tiny_causal_lm("llama", 64)
    assert attention.attention_kernel(model) == "sdpa per segment, float32"
    # where the varlen kernel can run the student's queries, it is the one named
    seen = []

    def capable(query):
        seen.append(tuple(query.shape))
        return object()

    monkeypatch.setattr(attention, "varlen_kernel", capable)
    assert attention.attention_kernel(model.to(torch.bfloat16)) == (
        "flash varlen (torch.nn.attention.varlen), bfloat16"
    )
    assert seen == [(1, 1, model.config.head_dim)]
