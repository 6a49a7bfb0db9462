"""Keep glibc's allocator from returning scoring's working memory to the kernel after every layer.

A CPU forward pass allocates and frees tensors of 1-30 MB per decoder layer (a 4,096-token row
through SmolLM2's MLP: four of 25 MB). glibc serves blocks over its mmap threshold with fresh
``mmap`` calls and trims the heap's free top once it passes its trim threshold; either way the next
layer's tensors land on new pages, which the kernel faults in and zeroes 4 KB at a time. Both
thresholds move with the allocation history by default, so how much a run pays for this varies
from run to run (docs/BENCHMARKS.md has the measurements). Fixed thresholds (32 MB for mmap,
128 MB kept at the heap's top) make each layer reuse the memory the last one freed.

The setting is per process and only changes how freed memory is reused, never what is computed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # blocks up to this size come from the heap, so freed ones are reused
TRIM_THRESHOLD = 128 << 20  # free memory kept at the heap's top before it goes back to the kernel
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


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
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        log.debug("allocator thresholds left to the environment's glibc settings")
        return False
    libc = ctypes.CDLL("libc.so.6")
    done = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    done = libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1 and done
    if not done:
        log.warning("glibc refused the allocator thresholds; scoring may page-fault more")
    return done
