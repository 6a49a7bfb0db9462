"""MLPs run a chunk of tokens at a time (ln_ray/score/chunking.py) give the same hidden states as
whole packs."""

from __future__ import annotations

import torch

from ln_ray.score.chunking import chunk_mlps
from tests.helpers import make_tiny_llama


def test_chunked_mlps_match_whole_packs():
    whole = make_tiny_llama(vocab_size=300, seed=1)
    chunked = make_tiny_llama(vocab_size=300, seed=1)
    assert chunk_mlps(chunked, chunk_tokens=7) == len(chunked.model.layers)
    assert chunk_mlps(chunked, chunk_tokens=7) == 0  # wrapping twice changes nothing
    ids = torch.randint(0, 300, (1, 53))
    with torch.inference_mode():
        expected = whole(ids).logits
        got = chunked(ids).logits
        short = chunked(ids[:, :5]).logits  # shorter than a chunk: the plain path
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(short, whole(ids[:, :5]).logits, atol=1e-5, rtol=0)


def test_each_mlp_call_sees_at_most_a_chunk():
    model = make_tiny_llama(vocab_size=300)
    chunk_mlps(model, chunk_tokens=16)
    seen: list[int] = []
    mlp = model.model.layers[0].mlp
    inner = mlp._ln_ray_forward
    mlp._ln_ray_forward = lambda h: seen.append(h.shape[-2]) or inner(h)
    with torch.inference_mode():
        model(torch.randint(0, 300, (1, 40)))
    assert seen == [16, 16, 8]
