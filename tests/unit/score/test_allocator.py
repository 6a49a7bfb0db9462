"""The allocator settings (ln_ray/score/allocator.py): a layer's freed working memory is reused,
except inside packs longer than the budget."""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import sys

import pytest

from ln_ray.score import scorer as scorer_module
from ln_ray.score.allocator import keep_freed_memory, on_glibc
from ln_ray.score.scorer import StudentScorer
from tests.helpers import make_traces

GLIBC = on_glibc()
# Rounds of what a decoder layer does: three 20 MB blocks allocated, written, freed. Prints the
# page faults of five rounds, after two rounds have sized the heap.
LAYERS = """
import contextlib, ctypes, json, resource, sys
from ln_ray.score.allocator import keep_freed_memory, map_large_blocks
mode = sys.argv[1]
if mode != "default":
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
if mode == "after_long_pack":
    with map_large_blocks():
        layer()
with map_large_blocks() if mode == "long_pack" else contextlib.nullcontext():
    for _ in range(2):
        layer()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        layer()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""
PAGES = 5 * 3 * (20 << 20) // 4096  # what the five rounds touch


def _faults(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* settings from the test's environment
    out = subprocess.run(
        [sys.executable, "-c", LAYERS, mode], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_freed_layer_memory_is_reused_without_page_faults():
    default, kept = _faults("default"), _faults("kept")
    # glibc's default trims the heap once 40 MB are free at its top: every round faults afresh.
    assert default > PAGES // 2, default
    assert kept < PAGES // 50, (kept, default)


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_a_long_pack_maps_its_blocks_and_returns_them_after():
    # Inside: every block is its own mapping, faulted in afresh and unmapped when freed.
    assert _faults("long_pack") > PAGES // 2
    # After: the heap reuses freed blocks again.
    assert _faults("after_long_pack") < PAGES // 50


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_the_users_own_glibc_settings_take_precedence(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    assert keep_freed_memory() is False


def test_the_scorer_maps_blocks_only_for_packs_over_the_budget(
    tiny_tokenizer, tiny_pair, monkeypatch
):
    model, _ = tiny_pair
    traces = make_traces(tiny_tokenizer, count=6, seed=3)
    budget = 40
    scorer = StudentScorer(model, window=2, token_budget=budget)
    packs = []

    @contextlib.contextmanager
    def recording(active):
        packs.append(active)
        yield

    monkeypatch.setattr(scorer_module, "map_large_blocks", recording)
    scorer.score(traces)
    plan = scorer.plan(traces)
    sequences = plan.global_sequences + plan.window_sequences
    long_ones = sum(len(seq.tokens) > budget for seq in sequences)
    assert 0 < long_ones < len(packs)  # a long sequence runs alone, flagged; other packs are not
    assert sum(packs) == long_ones
