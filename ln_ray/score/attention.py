"""Exact attention over packed sequences, with a shared chat prefix computed once per trace.

Many short sequences (a trace's global sequence, its local windows) are packed into one row of at
most ``token_budget`` tokens. Each is a *segment*; a segment attends only to itself (causally) and,
for local windows, to its trace's prefix keys and values, which the trace's global segment recorded:

    packed row:   [ global(t0): prefix|r.... ][ window(t0) ][ window(t0) ][ global(t1) ... ]
    keys seen:      itself, causal              prefix(t0) + itself, causal   ...

This equals running every window as its own fresh sequence ``prefix + window`` (positions from 0):
under causal attention the prefix's keys and values do not depend on what follows them. A banded
mask over one long sequence would NOT be equal, since deeper layers would see further back.

The function plugs into transformers' ``AttentionInterface`` so the model's own layers (projections,
RoPE, norms, MLPs) run unchanged; only the attention kernel call is replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTENTION_NAME = "ln_ray_segments"


@dataclass(frozen=True)
class Segment:
    """One sequence inside a packed row.

    Attributes:
        trace: Index of the trace the segment belongs to.
        start: Offset of the segment's first token in the packed row.
        length: Number of tokens.
        uses_prefix: Attend to the trace's recorded prefix keys/values before its own tokens.
        records_prefix: Number of leading tokens whose keys/values are recorded as the trace's
            prefix (0 for none).
    """

    trace: int
    start: int
    length: int
    uses_prefix: bool = False
    records_prefix: int = 0

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass
class PrefixStore:
    """Per trace: the chat prefix's keys and values (after RoPE) per layer, and its last hidden row.

    The last hidden row predicts the first token after the prefix, which is the first token of a
    window that has no context steps.
    """

    kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.kv.clear()
        self.hidden.clear()


@dataclass
class PackedLayout:
    """What the attention function needs to know about a packed row (passed as a forward kwarg)."""

    segments: list[Segment]
    store: PrefixStore


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    ln_layout: PackedLayout | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention for a packed row: block-diagonal causal, plus shared prefixes.

    Shapes follow transformers' attention interface: query ``[1, heads, n, d]``, key and value
    ``[1, kv_heads, n, d]``; returns ``[1, n, heads, d]``.
    """
    if ln_layout is None:
        # A plain forward (no packing): ordinary causal attention over one unpadded sequence.
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            is_causal=attention_mask is None,
            scale=scaling,
            enable_gqa=True,
        )
        return out.transpose(1, 2).contiguous(), None
    layer = module.layer_idx
    out = torch.empty_like(query)
    for seg in ln_layout.segments:
        q = query[:, :, seg.start : seg.stop]
        k = key[:, :, seg.start : seg.stop]
        v = value[:, :, seg.start : seg.stop]
        if seg.records_prefix:
            n = seg.records_prefix
            ln_layout.store.kv[(seg.trace, layer)] = (k[:, :, :n].clone(), v[:, :, :n].clone())
        if seg.uses_prefix:
            prefix_k, prefix_v = ln_layout.store.kv[(seg.trace, layer)]
            k = torch.cat([prefix_k, k], dim=2)
            v = torch.cat([prefix_v, v], dim=2)
            # Lower-right aligned causal mask: query i sees the whole prefix and own tokens <= i.
            mask = torch.ones(seg.length, k.shape[2], dtype=torch.bool, device=q.device).tril(
                k.shape[2] - seg.length
            )
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True
            )
        else:
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scaling, enable_gqa=True
            )
        out[:, :, seg.start : seg.stop] = o
    return out.transpose(1, 2).contiguous(), None


def install_segment_attention(model: torch.nn.Module) -> None:
    """Register the packed attention with transformers and switch ``model`` to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, segment_attention)
    model.set_attn_implementation(ATTENTION_NAME)


def packed_positions(segments: list[Segment], prefix_lens: list[int]) -> torch.Tensor:
    """Position ids for a packed row: each segment restarts at 0, or at ``P`` after a prefix."""
    parts = [
        torch.arange(seg.length) + (prefix_lens[seg.trace] if seg.uses_prefix else 0)
        for seg in segments
    ]
    return torch.cat(parts)
