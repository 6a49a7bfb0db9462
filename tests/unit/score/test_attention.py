"""Packed attention (ln_ray/score/attention.py): position ids in a pack, segments against a dense
mask, and the pack as one varlen call against per-segment SDPA.

FlashAttention's varlen kernel runs only on CUDA. Here a reference with the kernel's contract
stands in for it (tests/equivalence/test_gpu.py runs the real one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ln_ray.score import attention
from ln_ray.score.attention import (
    PackedLayout,
    PrefixStore,
    Segment,
    packed_positions,
    segment_attention,
    varlen_index,
)
from ln_ray.score.scorer import StudentScorer
from tests.helpers import make_tiny_causal_lm, make_traces


def test_positions_restart_per_segment_and_continue_after_prefix():
    segments = [Segment(0, 0, 3), Segment(1, 3, 2, uses_prefix=True), Segment(0, 5, 2)]
    positions = packed_positions(segments, prefix_lens=[10, 7])
    assert positions.tolist() == [0, 1, 2, 7, 8, 0, 1]


class _Layer(torch.nn.Module):
    layer_idx = 0


def _dense_reference(q, k, v, segments, prefixes, window=None):
    """Each segment on its own: [prefix keys + own keys], explicit causal mask, repeated heads.

    With a sliding ``window``, a query at position ``p`` sees key positions ``p - window + 1 .. p``.
    """
    outs = []
    for seg in segments:
        qs = q[:, :, seg.start : seg.stop]
        ks, vs = k[:, :, seg.start : seg.stop], v[:, :, seg.start : seg.stop]
        if seg.uses_prefix:
            pk, pv = prefixes[seg.trace]
            ks, vs = torch.cat([pk, ks], 2), torch.cat([pv, vs], 2)
        n_q, n_k = qs.shape[2], ks.shape[2]
        position = torch.arange(n_q)[:, None] + (n_k - n_q)
        allowed = torch.arange(n_k)[None, :] <= position
        if window is not None:
            allowed &= torch.arange(n_k)[None, :] > position - window
        rep = q.shape[1] // k.shape[1]
        scores = qs @ ks.repeat_interleave(rep, 1).transpose(-1, -2) / qs.shape[-1] ** 0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(F.softmax(scores, -1) @ vs.repeat_interleave(rep, 1))
    return torch.cat(outs, dim=2).transpose(1, 2)


def test_segment_attention_equals_independent_sequences():
    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 8
    segments = [
        Segment(0, 0, 6, records_prefix_len=4),
        Segment(1, 6, 5, records_prefix_len=2),
        Segment(0, 11, 3, uses_prefix=True),
        Segment(1, 14, 4, uses_prefix=True),
    ]
    n = 18
    q, k, v = (
        torch.randn(1, heads, n, dim),
        torch.randn(1, kv_heads, n, dim),
        torch.randn(1, kv_heads, n, dim),
    )
    store = PrefixStore()
    out, _ = segment_attention(_Layer(), q, k, v, None, ln_layout=PackedLayout(segments, store))
    prefixes = {0: (k[:, :, 0:4], v[:, :, 0:4]), 1: (k[:, :, 6:8], v[:, :, 6:8])}
    expected = _dense_reference(q, k, v, segments, prefixes)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(store.kv[(0, 0)][0], k[:, :, 0:4])


@pytest.mark.parametrize("window", [1, 3, 7, 100])
def test_segment_attention_keeps_the_sliding_window(window):
    torch.manual_seed(2)
    segments = [
        Segment(0, 0, 9, records_prefix_len=5),
        Segment(0, 9, 4, uses_prefix=True),  # sees 5 prefix keys: more than some windows
        Segment(1, 13, 2),
    ]
    q, k, v = torch.randn(1, 4, 15, 8), torch.randn(1, 2, 15, 8), torch.randn(1, 2, 15, 8)
    layout = PackedLayout(segments, PrefixStore())
    out, _ = segment_attention(_Layer(), q, k, v, None, ln_layout=layout, sliding_window=window)
    prefixes = {0: (k[:, :, 0:5], v[:, :, 0:5])}
    expected = _dense_reference(q, k, v, segments, prefixes, window=window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # A plain forward (no layout) keeps it too.
    plain, _ = segment_attention(_Layer(), q, k, v, None, sliding_window=window)
    whole = _dense_reference(q, k, v, [Segment(0, 0, 15)], {}, window=window)
    torch.testing.assert_close(plain, whole, atol=1e-5, rtol=1e-5)


def test_no_attention_across_segments():
    torch.manual_seed(1)
    segments = [Segment(0, 0, 4), Segment(1, 4, 4)]
    q, k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    layout = PackedLayout(segments, PrefixStore())
    out, _ = segment_attention(_Layer(), q, k, v, None, ln_layout=layout)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :4] += 5.0  # change the first segment only
    v2[:, :, :4] -= 3.0
    out2, _ = segment_attention(_Layer(), q, k2, v2, None, ln_layout=layout)
    assert torch.equal(out[:, 4:], out2[:, 4:])


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
    # Bank: trace 0's prefix at 0-3, trace 1's at 4-5; the pack's own keys from 6 on.
    assert index.traces == [0, 1]
    assert index.gather.tolist() == [6, 7, 8, 4, 5, 9, 10, 0, 1, 2, 3, 11, 12]
    assert index.cu_q.tolist() == [0, 3, 5, 7]
    assert index.cu_k.tolist() == [0, 3, 7, 13]
    assert (index.max_q, index.max_k) == (3, 6)
    assert index.cu_q.dtype == index.cu_k.dtype == torch.int32


def test_one_varlen_call_per_pack_gives_the_per_segment_scores(
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
    # Every pack, every layer: one call over all of the pack's tokens (and there are several packs).
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
