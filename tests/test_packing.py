"""Position ids in a pack, and the packed attention against a dense mask."""

import pytest
import torch
import torch.nn.functional as F

from ln_ray.score.attention import (
    PackedLayout,
    PrefixStore,
    Segment,
    packed_positions,
    segment_attention,
)


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
