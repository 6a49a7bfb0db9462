"""Keep glibc's allocator from returning scoring's working memory to the kernel after every layer.

A CPU forward pass allocates and frees tensors of 1-30 MB per decoder layer (a 4,096-token pack
through SmolLM2's MLP: four of 25 MB). glibc serves blocks over its mmap threshold with fresh
``mmap`` calls and trims the heap's free top once it passes its trim threshold; either way the next
layer's tensors land on new pages, which the kernel faults in and zeroes 4 KB at a time. Both
thresholds move with the allocation history by default, so how much a run pays for this varies
from run to run (docs/BENCHMARKS.md has the measurements). Fixed thresholds (32 MB for mmap,
128 MB kept at the heap's top) make each layer reuse the memory the last one freed.

That reuse suits packs of at most ``token_budget`` tokens, whose blocks have the same few sizes
pack after pack. A longer pack (one long global sequence) allocates blocks that grow with its
length, and keeping those in the heap fragments it, so a long trace's peak memory grows well past
what its blocks need (docs/BENCHMARKS.md). Such packs run under ``map_large_blocks``, where every
block of 1 MB or more is mapped on its own and unmapped when freed, as glibc's default does for
large blocks.

The settings are per process and only change how freed memory is reused, never what is computed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # blocks up to this size come from the heap, so freed ones are reused
TRIM_THRESHOLD = 128 << 20  # free memory kept at the heap's top before it goes back to the kernel
LONG_ROW_MMAP_THRESHOLD = 1 << 20  # within map_large_blocks
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_kept: dict[str, int] = {}  # the mmap threshold keep_freed_memory set, once it has


def keep_freed_memory(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Fix glibc's mmap and trim thresholds for this process.

    Does nothing outside glibc, or when the user set the thresholds themselves through glibc's
    own environment variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
    ``GLIBC_TUNABLES``), which take precedence.

    Args:
        mmap_threshold: Bytes; larger blocks are mapped and unmapped on their own.
        trim_threshold: Bytes of free memory at the heap's top kept for reuse.

    Returns:
        Whether the thresholds were set.
    """
    if not on_glibc():
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        log.debug("allocator thresholds left to the environment's glibc settings")
        return False
    libc = _libc()
    done = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    done = libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1 and done
    if not done:
        log.warning("glibc refused the allocator thresholds; scoring may page-fault more")
        return False
    _kept["mmap_threshold"] = mmap_threshold
    return True


@contextlib.contextmanager
def map_large_blocks(active: bool = True):
    """Within the block, blocks of 1 MB or more are mapped and unmapped on their own.

    Does nothing unless ``active`` and ``keep_freed_memory`` set the thresholds.
    """
    kept = _kept.get("mmap_threshold")
    if not active or kept is None:
        yield
        return
    libc = _libc()
    libc.mallopt(M_MMAP_THRESHOLD, LONG_ROW_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, kept)


def on_glibc() -> bool:
    """Whether this process runs on Linux with glibc, whose allocator these settings are for."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")
