"""The allocator setting keeps a layer's freed working memory for the next layer."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from ln_ray.score.allocator import keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Rounds of what a decoder layer does: three 20 MB blocks allocated, written, freed. Prints the
# page faults of the last rounds, after a first round has sized the heap.
LAYERS = """
import ctypes, json, resource, sys
from ln_ray.score.allocator import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 20 << 20
def layer():
    blocks = [libc.malloc(size) for _ in range(3)]
    for block in blocks:
        libc.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
for _ in range(2):
    layer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    layer()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def _faults(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* settings from the test's environment
    out = subprocess.run(
        [sys.executable, "-c", LAYERS, mode], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_freed_layer_memory_is_reused_without_page_faults():
    pages = 5 * 3 * (20 << 20) // 4096  # what the five rounds touch
    default, kept = _faults("default"), _faults("kept")
    # glibc's default trims the heap once 40 MB are free at its top: every round faults afresh.
    assert default > pages // 2, default
    assert kept < pages // 50, (kept, default)


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_the_users_own_glibc_settings_take_precedence(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    assert keep_freed_memory() is False
