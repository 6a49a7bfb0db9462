"""Settle oneMKL's vector-math dispatch before any multi-threaded use.

torch computes contiguous float unary ops (``cos``, ``sin``, ``exp``, ``log``, ``sqrt``,
``tanh`` and others) with oneMKL's vector math (VML), each intra-op thread on its own chunk. oneMKL
picks each function's kernel on that function's first call; when the first call runs on several
threads at once, one of them can run a low-accuracy kernel for its chunk of that one call
(pytorch/pytorch issue 188792, with the oneMKL that torch's wheels bundle). A fresh process's first
forward then gets RoPE's cosines wrong by about 1e-4 for half the positions, which moved a trace's
log-probs by 2e-3 in about one process in seven here. One single-element call of each function, per
dtype, settles the dispatch on one thread first; later calls are exact as usual.
"""

from __future__ import annotations

import functools

import torch

# The float unary ops ATen sends to oneMKL (ATen/cpu/vml.h).
VML_OPS = (
    "acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin",
    "sqrt", "tan", "tanh", "trunc",
)  # fmt: skip


@functools.cache
def settle_vector_math() -> None:
    """Call each VML-backed op once on one element, in fp32 and fp64 (once per process)."""
    with torch.inference_mode():
        for dtype in (torch.float32, torch.float64):
            one = torch.full((1,), 0.5, dtype=dtype)
            for name in VML_OPS:
                getattr(torch, name)(one)
