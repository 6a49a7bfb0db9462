"""Per-trace metrics from per-token log-probs and ranks (DESIGN.md, "Definitions")."""

from __future__ import annotations

import numpy as np


def trace_metrics(
    global_logprobs: np.ndarray,
    global_ranks: np.ndarray,
    local_logprobs: np.ndarray,
    step_bounds: np.ndarray,
    rank_clip: int,
    unconditional: tuple[np.ndarray, int] | None = None,
) -> dict[str, object]:
    """GALP, LALP, lalp_drop1, lalp_token, IFD (two variants), RSR, avg_rank, avg_surprisal and
    per-step local log-probs.

    Args:
        global_logprobs: Log-probs of the globally scored response tokens (a truncated trace has
            fewer than its response tokens).
        global_ranks: Ranks of the same tokens.
        local_logprobs: Windowed log-probs of every response token.
        step_bounds: ``n_steps + 1`` token boundaries of the steps.
        rank_clip: ``r_max``; ranks above it count as ``r_max``.
        unconditional: The log-probs of response tokens given no prompt, and the response index
            of the first (``planning.unconditional_sequence``); None: no IFD.

    Returns:
        A dict of the metrics. A step with no tokens of its own has step log-prob None and does not
        count towards LALP; a metric over no tokens is NaN. ``lalp_drop1`` is LALP with each
        step's first token left out of its step mean (ASLEC-DROP, arXiv 2604.06834): a step of
        one token then owns no scored token and is skipped, as an empty step is. ``ifd`` and
        ``ifd_ppl``: ``ifd_ratios``.
    """
    step_logprobs: list[float | None] = []
    for a, b in zip(step_bounds[:-1], step_bounds[1:]):
        step_logprobs.append(
            float(np.mean(local_logprobs[a:b], dtype=np.float64)) if b > a else None
        )
    scored_steps = [s for s in step_logprobs if s is not None]
    dropped = [
        float(np.mean(local_logprobs[a + 1 : b], dtype=np.float64))
        for a, b in zip(step_bounds[:-1], step_bounds[1:])
        if b - a >= 2
    ]
    surprisal = -global_logprobs.astype(np.float64)
    clipped = np.minimum(global_ranks, rank_clip).astype(np.float64)
    total_surprisal = float(surprisal.sum())
    return {
        "galp": _mean(-surprisal),
        "lalp": float(np.mean(scored_steps)) if scored_steps else float("nan"),
        "lalp_drop1": float(np.mean(dropped)) if dropped else float("nan"),
        "lalp_token": _mean(local_logprobs),
        **ifd_ratios(global_logprobs, unconditional),
        "rsr": float(clipped.sum()) / total_surprisal if total_surprisal > 0 else float("nan"),
        "avg_rank": _mean(clipped),
        "avg_surprisal": _mean(surprisal),
        "step_logprobs": step_logprobs,
    }


def ifd_ratios(
    global_logprobs: np.ndarray, unconditional: tuple[np.ndarray, int] | None
) -> dict[str, float]:
    """Instruction-following difficulty (Cherry LLM, arXiv 2308.12032), over the response tokens
    scored with no prompt (the same tokens of the global pass): with ``s(A|Q)`` and ``s(A)`` the
    mean token cross-entropies given the prompt and given none, ``ifd`` is the loss ratio
    ``s(A|Q) / s(A)`` (Cherry's) and ``ifd_ppl`` the perplexity ratio ``exp(s(A|Q)) /
    exp(s(A))`` (Superfiltering's). Lower: the prompt helps the student more. NaN without
    unconditional log-probs (or with ``s(A) = 0`` for ``ifd``)."""
    if unconditional is None or not len(unconditional[0]):
        return {"ifd": float("nan"), "ifd_ppl": float("nan")}
    logprobs, offset = unconditional
    given = -float(np.mean(global_logprobs[offset : offset + len(logprobs)], dtype=np.float64))
    alone = -float(np.mean(logprobs, dtype=np.float64))
    return {
        "ifd": given / alone if alone > 0 else float("nan"),
        "ifd_ppl": float(np.exp(given - alone)),
    }


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values, dtype=np.float64)) if len(values) else float("nan")
