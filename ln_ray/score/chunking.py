"""Run each decoder layer's MLP on a long pack a chunk of tokens at a time.

A 32K-token global sequence through SmolLM2's MLP would hold four ``[32K x 1536]`` fp32 tensors at
once (800 MB); for a 7B student it is gigabytes. The MLP is position-wise (each token's output
depends on that token alone), so running it on slices of the token axis gives the same values and
bounds its working memory by the chunk. Attention needs the whole pack and is not chunked; its
kernel (flash attention on CPU and GPU) already works in tiles.
"""

from __future__ import annotations

import types

import torch


def chunk_mlps(model: torch.nn.Module, chunk_tokens: int) -> int:
    """Make every decoder layer's ``mlp`` process at most ``chunk_tokens`` tokens per call.

    Args:
        model: A transformers causal LM whose base model has ``layers`` with an ``mlp`` each
            (Llama, Qwen, Mistral, Gemma, Phi-3 and most decoder-only families).
        chunk_tokens: Tokens per MLP call.

    Returns:
        How many MLPs were wrapped (0 for an architecture without that layout: it still scores
        exactly, only without the memory bound).
    """
    wrapped = 0
    for layer in getattr(model.base_model, "layers", []):
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, torch.nn.Module) and not hasattr(mlp, "_ln_ray_forward"):
            mlp._ln_ray_forward = mlp.forward
            mlp._ln_ray_chunk = chunk_tokens
            mlp.forward = types.MethodType(_chunked_forward, mlp)
            wrapped += 1
    return wrapped


def set_mlp_chunk(model: torch.nn.Module, chunk_tokens: int) -> None:
    """Change how many tokens each MLP that ``chunk_mlps`` wrapped processes per call."""
    for module in model.modules():
        if hasattr(module, "_ln_ray_chunk"):
            module._ln_ray_chunk = chunk_tokens


def _chunked_forward(self: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    n, chunk = hidden.shape[-2], self._ln_ray_chunk
    if n <= chunk:
        return self._ln_ray_forward(hidden)
    first = self._ln_ray_forward(hidden[..., :chunk, :])
    if not isinstance(first, torch.Tensor):  # e.g. a mixture of experts that returns a tuple
        return self._ln_ray_forward(hidden)
    out = first.new_empty((*hidden.shape[:-1], first.shape[-1]))
    out[..., :chunk, :] = first
    for a in range(chunk, n, chunk):
        out[..., a : a + chunk, :] = self._ln_ray_forward(hidden[..., a : a + chunk, :])
    return out
