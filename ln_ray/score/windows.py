"""Which token sequences the local (windowed) pass must run, per trace.

A token of step ``S_i`` is scored after ``prefix + S_{i-w_i} .. S_{i-1} + (earlier tokens of S_i)``,
where ``w_i = k`` (fixed window) or ``ceil(f * (i - 1))`` (a fraction of the preceding steps). With
0-based steps, step ``i`` starts its context at step ``c_i = max(0, i - w_i)``.

Consecutive steps with the same context start share one sequence: the window of step ``i`` is a
prefix of the window of step ``i + 1`` when ``c_i == c_{i+1}``. In particular every step with
``c_i == 0`` (the first ``k + 1`` steps) is served by the trace's global sequence itself, so those
tokens are taken from the global pass and cost nothing extra.

Both shortcuts assume a token's log-prob does not depend on what follows it. A student whose RoPE
frequencies depend on the sequence's length (longrope, dynamic NTK) breaks that past a length
limit: a step whose own window is longer than ``max_length`` gets a span of its own, exactly its
window, and takes nothing from the global pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowSpan:
    """A local sequence over response tokens ``[context_start, stop)`` (after the chat prefix).

    Tokens ``[score_start, stop)`` are scored by it; the tokens before ``score_start`` are context.
    """

    context_start: int
    score_start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.context_start


def context_starts(n_steps: int, window: int, fraction: float | None = None) -> np.ndarray:
    """The first context step ``c_i`` of every step ``i`` (0-based).

    Args:
        n_steps: Number of steps.
        window: Fixed window ``k`` (preceding steps seen); used when ``fraction`` is None.
        fraction: If set, step ``i`` sees the preceding ``ceil(fraction * i)`` steps.

    Returns:
        Non-decreasing int64 array of length ``n_steps``.
    """
    steps = np.arange(n_steps, dtype=np.int64)
    if fraction is None:
        seen = np.full(n_steps, window, dtype=np.int64)
    else:
        seen = np.array([math.ceil(fraction * i - 1e-9) for i in range(n_steps)], dtype=np.int64)
    return np.maximum(steps - seen, 0)


def plan_windows(
    step_bounds: np.ndarray,
    window: int,
    fraction: float | None = None,
    global_tokens: int = 0,
    max_length: int | None = None,
) -> tuple[int, list[WindowSpan]]:
    """Plan the local pass of one trace.

    Args:
        step_bounds: ``n_steps + 1`` token boundaries of the steps in the response.
        window: Fixed window ``k``.
        fraction: Optional window as a fraction of preceding steps (overrides ``window``).
        global_tokens: How many leading response tokens the global pass scored (it may be
            truncated); local log-probs of steps whose context starts at step 0 are reused from it.
        max_length: If set, a step whose window spans more response tokens runs alone, as
            exactly its own window.

    Returns:
        ``(reused, spans)``: the local log-probs of response tokens ``[0, reused)`` equal the global
        ones; ``spans`` are the sequences to run for every other token, in order.
    """
    bounds = np.asarray(step_bounds, dtype=np.int64)
    starts = context_starts(len(bounds) - 1, window, fraction)
    alone = np.zeros(len(starts), dtype=bool)
    if max_length is not None:
        alone = bounds[1:] - bounds[starts] > max_length
    # Steps sharing a context start have growing windows, so the ones alone come last.
    leading = int(np.sum((starts == 0) & ~alone))
    reused = min(global_tokens, int(bounds[leading]))
    spans: list[WindowSpan] = []
    i = 0
    while i < len(starts):
        j = i
        while j + 1 < len(starts) and starts[j + 1] == starts[i] and not alone[j + 1]:
            j += 1
        context_start = int(bounds[starts[i]])
        score_start = max(int(bounds[i]), reused) if starts[i] == 0 else int(bounds[i])
        stop = int(bounds[j + 1])
        if score_start < stop:
            spans.append(WindowSpan(context_start, score_start, stop))
        i = j + 1
    return reused, spans
