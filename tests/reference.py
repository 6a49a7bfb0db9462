"""A slow, obviously-correct reference scorer: one plain forward per window, full logits.

It shares nothing with ln_ray.score but the definitions in DESIGN.md, so agreement is evidence;
it runs on a model of its own, never one the scorer patched.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ln_ray.config import ScoringConfig
from ln_ray.score.attention import ATTENTION_NAME


def _forward_logprobs(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary fp32 logits and log-softmax of one unpadded sequence."""
    # A model the scorer was built on runs ln-ray's attention: the reference would run the code
    # under test. It needs a copy of its own.
    assert model.config._attn_implementation != ATTENTION_NAME, "the reference's model is patched"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits, torch.log_softmax(logits, dim=-1)


def reference_scores(
    model,
    trace,
    *,
    window=ScoringConfig.window,
    fraction=None,
    max_tokens=10**9,
    rank_clip=ScoringConfig.rank_clip,
    unconditional=None,
):
    """Score one TokenizedTrace by brute force; returns a dict like TraceScores' fields.

    ``unconditional``: the context the student has with no prompt (a list of token ids, maybe
    empty); None: no IFD (NaN)."""
    ids = trace.input_ids.tolist()
    p = trace.prefix_len
    t = len(ids) - p
    bounds = trace.step_bounds.tolist()
    n_steps = len(bounds) - 1

    g = max(0, min(t, max_tokens - p))
    global_lp, global_rank = [], []
    if g:
        logits, logprobs = _forward_logprobs(model, ids[: p + g])
        for j in range(g):
            row, target = p + j - 1, ids[p + j]
            global_lp.append(logprobs[row, target].item())
            global_rank.append(int((logits[row] > logits[row, target]).sum().item()) + 1)

    local_lp = [math.nan] * t
    for i in range(n_steps):
        if bounds[i] == bounds[i + 1]:
            continue
        seen = window if fraction is None else math.ceil(fraction * i - 1e-9)
        first = bounds[max(0, i - seen)]
        window_ids = ids[:p] + ids[p + first : p + bounds[i + 1]]
        _, logprobs = _forward_logprobs(model, window_ids)
        for j in range(bounds[i], bounds[i + 1]):
            row = p + (j - first) - 1
            local_lp[j] = logprobs[row, ids[p + j]].item()

    step_means = [
        float(np.mean(local_lp[a:b])) if b > a else None for a, b in zip(bounds[:-1], bounds[1:])
    ]
    # lalp_drop1 from its definition: each step's mean without its first token; a step left
    # with no token is skipped.
    dropped = [local_lp[a + 1 : b] for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= 2]
    clipped = [min(r, rank_clip) for r in global_rank]
    ifd = ifd_ppl = math.nan
    if unconditional is not None:
        # IFD from its definition: the response's global tokens after the no-prompt context,
        # one plain forward; with no context, the first response token has no predictor and
        # leaves both means.
        u = list(unconditional)
        n = max(0, min(g, max_tokens - len(u)))
        skip = 0 if u else 1
        if n > skip:
            _, logprobs = _forward_logprobs(model, u + ids[p : p + n])
            alone = [logprobs[len(u) + j - 1, ids[p + j]].item() for j in range(skip, n)]
            loss_given = -float(np.mean(global_lp[skip:n]))
            loss_alone = -float(np.mean(alone))
            ifd = loss_given / loss_alone
            ifd_ppl = math.exp(loss_given) / math.exp(loss_alone)
    return {
        "global_logprobs": np.array(global_lp),
        "global_ranks": np.array(global_rank, dtype=np.int64),
        "local_logprobs": np.array(local_lp),
        "step_logprobs": step_means,
        "galp": float(np.mean(global_lp)) if g else math.nan,
        "lalp": float(np.mean([s for s in step_means if s is not None])),
        "lalp_token": float(np.mean(local_lp)),
        "lalp_drop1": float(np.mean([np.mean(d) for d in dropped])) if dropped else math.nan,
        "ifd": ifd,
        "ifd_ppl": ifd_ppl,
        "rsr": sum(clipped) / -sum(global_lp) if g else math.nan,
        "avg_rank": float(np.mean(clipped)) if g else math.nan,
        "avg_surprisal": -float(np.mean(global_lp)) if g else math.nan,
        "truncated": g < t,
    }


RSR_METRICS = ("rsr", "avg_rank", "avg_surprisal")


def assert_matches_reference(fast, ref):
    """The fast scorer's TraceScores equal the reference's: log-probs within 1e-4, ranks exactly."""
    np.testing.assert_allclose(fast.global_logprobs, ref["global_logprobs"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(fast.global_ranks, ref["global_ranks"])
    np.testing.assert_allclose(fast.local_logprobs, ref["local_logprobs"], atol=1e-4, rtol=0)
    for key in (*("galp", "lalp", "lalp_drop1", "lalp_token", "ifd", "ifd_ppl"), *RSR_METRICS):
        assert fast.__dict__[key] == pytest.approx(ref[key], abs=1e-4, nan_ok=True), key
    assert fast.truncated == ref["truncated"]
    for a, b in zip(fast.step_logprobs, ref["step_logprobs"], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a == pytest.approx(b, abs=1e-4)
