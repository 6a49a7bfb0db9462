"""Exact attention over packed sequences, with a shared chat prefix computed once per trace.

Many short sequences (a trace's global sequence, its local windows) are packed into one *pack* of
at most ``token_budget`` tokens, run as one forward call (``planning.py``). Each is a *segment*; a
segment attends only to itself (causally) and, for local windows, to its trace's prefix keys and
values, which the trace's global segment recorded:

    pack:         [ global(t0): prefix|r.... ][ window(t0) ][ window(t0) ][ global(t1) ... ]
    keys seen:      itself, causal              prefix(t0) + itself, causal   ...

This equals running every window as its own fresh sequence ``prefix + window`` (positions from 0):
under causal attention the prefix's keys and values do not depend on what follows them. A banded
mask over one long sequence would NOT be equal, since deeper layers would see further back.

The function plugs into transformers' ``AttentionInterface`` so the model's own layers (projections,
RoPE, norms, MLPs) run unchanged; only the attention kernel call is replaced.

Two kernels run it. On a GPU in fp16/bf16, where torch has FlashAttention's varlen kernel
(``torch.nn.attention.varlen``), the whole pack is one call: each segment's keys are gathered as
``prefix + own tokens`` and the kernel's causal mask, aligned to the bottom right when a segment has
more keys than queries, is exactly the mask above. Elsewhere (CPU, fp32) each segment is one SDPA
call; batching them into one padded call was slower on a CPU.

A sliding-window layer (Mistral, Phi-3, Gemma-3's local layers) receives its window ``W``
from transformers with each call; query position ``q`` then sees key position ``k`` only when
``q - k < W``, as in transformers' own masks. Within a segment, prefix keys and own keys hold
positions ``0, 1, ...`` in order, so the band is a band on key columns; windows stay exact because
a banded causal layer still never looks ahead.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ln_ray.score.chunking import set_mlp_chunk
from ln_ray.score.transfer import to_device
from ln_ray.score.vetting import StudentError

ATTENTION_NAME = "ln_ray_segments"
# Arguments a model's attention layer may pass that do not change what attention computes. Any
# other argument with a value (attention sinks as ``s_aux``, a ``softcap``...) changes it, and
# the packed kernels would silently leave it out.
_NEUTRAL_ARGUMENTS = frozenset(
    {
        "position_ids",
        "use_cache",
        "cache_position",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "past_key_value",
        "past_key_values",
        "position_embeddings",
    }
)


@dataclass(frozen=True)
class Segment:
    """One sequence inside a pack.

    Attributes:
        trace: Index of the trace the segment belongs to.
        start: Offset of the segment's first token in the pack.
        length: Number of tokens.
        uses_prefix: Attend to the trace's recorded prefix keys/values before its own tokens.
        records_prefix_len: Number of leading tokens whose keys/values are recorded as the trace's
            prefix (0 for none).
    """

    trace: int
    start: int
    length: int
    uses_prefix: bool = False
    records_prefix_len: int = 0

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass
class PrefixStore:
    """Per trace: the chat prefix's keys and values (after RoPE) per layer, and the hidden state
    of its last position.

    That hidden state predicts the first token after the prefix, which is the first token of a
    window that has no context steps.
    """

    kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.kv.clear()
        self.hidden.clear()


@dataclass(frozen=True)
class VarlenIndex:
    """Where each segment's queries and keys lie when a pack runs as one varlen call.

    Keys are gathered from ``cat(prefix bank, pack keys)``: the bank holds the prefixes of
    ``traces`` end to end, then come the pack's own keys.

    Attributes:
        traces: Traces whose prefixes the pack's segments attend to, in bank order.
        gather: ``[total keys]`` index of each segment's keys (its prefix, then its own tokens).
        cu_q: ``[segments + 1]`` int32 offsets of each segment's queries.
        cu_k: ``[segments + 1]`` int32 offsets of each segment's keys.
        max_q: Longest segment, in queries.
        max_k: Longest segment, in keys.
    """

    traces: list[int]
    gather: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def varlen_index(
    segments: list[Segment], prefix_lens: dict[int, int], device: torch.device
) -> VarlenIndex:
    """The varlen layout of a pack whose segments tile it from offset 0, in order.

    Args:
        segments: The pack's segments.
        prefix_lens: Recorded prefix length of every trace a segment attends to.
        device: Where the index tensors go.
    """
    traces = sorted({seg.trace for seg in segments if seg.uses_prefix})
    bank_start, bank_size = {}, 0
    for trace in traces:
        bank_start[trace] = bank_size
        bank_size += prefix_lens[trace]
    parts, cu_q, cu_k = [], [0], [0]
    for seg in segments:
        assert seg.start == cu_q[-1], "segments must tile the pack in order"
        keys = seg.length
        if seg.uses_prefix:
            first = bank_start[seg.trace]
            parts.append(torch.arange(first, first + prefix_lens[seg.trace]))
            keys += prefix_lens[seg.trace]
        parts.append(torch.arange(seg.start, seg.stop) + bank_size)
        cu_q.append(seg.stop)
        cu_k.append(cu_k[-1] + keys)
    return VarlenIndex(
        traces=traces,
        gather=to_device(torch.cat(parts), device),
        cu_q=to_device(np.asarray(cu_q, dtype=np.int32), device),
        cu_k=to_device(np.asarray(cu_k, dtype=np.int32), device),
        max_q=max(seg.length for seg in segments),
        max_k=max(b - a for a, b in zip(cu_k, cu_k[1:])),
    )


@dataclass
class PackedLayout:
    """What the attention function needs to know about a pack (passed as a forward kwarg)."""

    segments: list[Segment]
    store: PrefixStore
    varlen: VarlenIndex | None = None  # built by the pack's first layer, when the kernel is varlen
    attended: set[int] = field(default_factory=set)  # the layers whose attention ran the pack


def varlen_kernel(query: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """torch's FlashAttention varlen kernel, where it can run this query; else None."""
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    head_dim = query.shape[-1]
    if head_dim % 8 or head_dim > 256 or not _flash_capable(query.device.index or 0):
        return None
    return _torch_varlen()


def attention_kernel(model: torch.nn.Module) -> str:
    """Which kernel scores this student's packs, in words (logged, and recorded in the
    manifest): the varlen kernel, or one SDPA call per segment, and the dtype they run in."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    param = next(model.parameters())
    probe = torch.empty((1, 1, head_dim), dtype=param.dtype, device=param.device)
    dtype = str(param.dtype).removeprefix("torch.")
    if varlen_kernel(probe) is not None:
        return f"flash varlen (torch.nn.attention.varlen), {dtype}"
    return f"sdpa per segment, {dtype}"


@functools.cache
def _flash_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # Ampere or newer


@functools.cache
def _torch_varlen() -> Callable[..., torch.Tensor] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    # Older torch releases had a different signature (``is_causal``, no GQA): not used.
    parameters = inspect.signature(varlen_attn).parameters
    return varlen_attn if {"window_size", "enable_gqa"} <= parameters.keys() else None


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    ln_layout: PackedLayout | None = None,
    sliding_window: int | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention for a pack: block-diagonal causal, plus shared prefixes.

    Shapes follow transformers' attention interface: query ``[1, heads, n, d]``, key and value
    ``[1, kv_heads, n, d]``; returns ``[1, n, heads, d]``. ``sliding_window`` is the layer's
    window (None: full causal attention).

    Raises:
        StudentError: The layer asks for something this attention does not compute (attention
            sinks, softcapping, a non-causal mask).
    """
    _check_arguments(kwargs)
    if ln_layout is None:
        # A plain forward (no packing): causal attention over one unpadded sequence.
        n = query.shape[2]
        mask = attention_mask
        if mask is None:
            mask = causal_mask(n, n, sliding_window, query.device)
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=True,
        )
        return out.transpose(1, 2).contiguous(), None
    layer = module.layer_idx
    ln_layout.attended.add(layer)
    store = ln_layout.store
    for seg in ln_layout.segments:
        if seg.records_prefix_len:
            n = seg.records_prefix_len
            k = key[:, :, seg.start : seg.start + n]
            v = value[:, :, seg.start : seg.start + n]
            store.kv[(seg.trace, layer)] = (k.clone(), v.clone())
    kernel = varlen_kernel(query)
    if kernel is not None:
        return _varlen_pack(
            kernel, query, key, value, ln_layout, layer, scaling, sliding_window
        ), None
    out = torch.empty_like(query)
    for seg in ln_layout.segments:
        q = query[:, :, seg.start : seg.stop]
        k = key[:, :, seg.start : seg.stop]
        v = value[:, :, seg.start : seg.stop]
        if seg.uses_prefix:
            prefix_k, prefix_v = store.kv[(seg.trace, layer)]
            k = torch.cat([prefix_k, k], dim=2)
            v = torch.cat([prefix_v, v], dim=2)
        mask = causal_mask(seg.length, k.shape[2], sliding_window, q.device)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=True
        )
        out[:, :, seg.start : seg.stop] = o
    return out.transpose(1, 2).contiguous(), None


def _check_arguments(arguments: dict[str, object]) -> None:
    if arguments.get("is_causal", True) is False:
        raise StudentError(
            "the student's attention is not causal (is_causal=False), which ln-ray's packed "
            "attention does not reproduce: choose a causal language model"
        )
    changing = sorted(
        name
        for name, value in arguments.items()
        if name not in _NEUTRAL_ARGUMENTS and name != "is_causal" and value is not None
    )
    if changing:
        described = "attention sinks" if "s_aux" in changing else "attention arguments"
        raise StudentError(
            f"the student's attention layers pass {described} ({', '.join(changing)}) that "
            "ln-ray's packed attention does not apply, so its scores would not be the "
            "student's: choose another student"
        )


def causal_mask(
    n_queries: int, n_keys: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Which keys each query sees, when the queries are the last ``n_queries`` of the keys.

    Query ``i`` sits at position ``p = n_keys - n_queries + i`` and sees key ``j`` when
    ``j <= p`` and, under a sliding window ``W``, ``p - j < W`` (transformers' rule).

    Returns:
        A ``[n_queries, n_keys]`` bool mask, or None where plain ``is_causal`` says the same
        (as many queries as keys, and no key ever falls out of the window).
    """
    offset = n_keys - n_queries
    banded = window is not None and window < n_keys
    if offset == 0 and not banded:
        return None
    mask = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(offset)
    if banded:
        mask = mask.triu(offset - window + 1)
    return mask


def _varlen_pack(
    kernel: Callable[..., torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: PackedLayout,
    layer: int,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """The whole pack in one varlen call; returns ``[1, n, heads, d]``."""
    store = layout.store
    if layout.varlen is None:
        prefix_lens = {
            seg.trace: store.kv[(seg.trace, layer)][0].shape[2]
            for seg in layout.segments
            if seg.uses_prefix
        }
        layout.varlen = varlen_index(layout.segments, prefix_lens, query.device)
    index = layout.varlen

    def gathered(own: torch.Tensor, part: int) -> torch.Tensor:
        # [1, kv_heads, n, d] tensors -> [keys, kv_heads, d], each segment's prefix then itself.
        bank = [store.kv[(trace, layer)][part][0].transpose(0, 1) for trace in index.traces]
        return torch.cat([*bank, own[0].transpose(0, 1)]).index_select(0, index.gather)

    out = kernel(
        query[0].transpose(0, 1).contiguous(),
        gathered(key, 0),
        gathered(value, 1),
        index.cu_q,
        index.cu_k,
        index.max_q,
        index.max_k,
        scale=scaling,
        # Causal, aligned to the bottom right (the prefix stays visible); a sliding window W
        # keeps the W - 1 keys before each query's own, as FlashAttention counts its left window.
        window_size=(-1, 0) if sliding_window is None else (sliding_window - 1, 0),
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out[None]


def install_segment_attention(model: torch.nn.Module) -> None:
    """Register the packed attention with transformers and switch ``model`` to it (the
    attention it had is kept for ``plain_forward``)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, segment_attention)
    current = getattr(model.config, "_attn_implementation", None)
    if current != ATTENTION_NAME:
        model._ln_ray_plain_attention = current or "sdpa"
    model.set_attn_implementation(ATTENTION_NAME)


@contextlib.contextmanager
def plain_forward(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``model`` runs as transformers runs it: the attention it was loaded
    with (not the packed one) and its MLPs whole (``chunking.py`` off)."""
    plain = getattr(model, "_ln_ray_plain_attention", None)
    chunk = next((m._ln_ray_chunk for m in model.modules() if hasattr(m, "_ln_ray_chunk")), None)
    if plain is not None:
        model.set_attn_implementation(plain)
    set_mlp_chunk(model, sys.maxsize)
    try:
        yield
    finally:
        if chunk is not None:
            set_mlp_chunk(model, chunk)
        if plain is not None:
            model.set_attn_implementation(ATTENTION_NAME)


def packed_positions(segments: list[Segment], prefix_lens: list[int]) -> torch.Tensor:
    """Position ids for a pack: each segment restarts at 0, or at ``P`` after a prefix."""
    parts = [
        torch.arange(seg.length) + (prefix_lens[seg.trace] if seg.uses_prefix else 0)
        for seg in segments
    ]
    return torch.cat(parts)
