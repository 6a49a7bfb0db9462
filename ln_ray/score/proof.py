"""Prove a student before it scores: the packed scorer against a plain forward, on a probe.

The equivalence tests prove the packed scorer for the families they cover
(``vetting.COVERED_MODEL_TYPES``); a student of any family, covered or not, may still hold
something they never met (a new layer in a new transformers release, remote code). So every
scoring actor, before its first batch, scores a probe through the very scorer it will use and
compares it with a plain transformers forward of each sequence:

- the probe is three traces of random tokens (seeded): two short ones packed together, whose
  windows attend to a recorded prefix, with an empty step and enough predictions to fill several
  head chunks; and, for a student that declares a sliding window, a trace whose global sequence
  and windows run past the longest window (within the global cap);
- the reference runs each trace's global sequence and each step's window (the definition in
  DESIGN.md: prefix, the window's steps, the step's earlier tokens) as its own sequence through
  the model as transformers runs it (its own attention, unchunked MLPs, its own output head and
  logit scaling), with fp32 log-softmax;
- every global and local log-prob is compared; a difference beyond the dtype's tolerance, or a
  decoder layer whose attention the packed path never ran (a layer that mixes tokens some other
  way), stops the job before any output, naming the student, the position and the difference.

Tolerances (``TOLERANCES``: on the largest per-token difference and on the mean one, in nats).
The two paths run the same weights in the same dtype and differ only in the order of
floating-point operations (attention per segment or as one varlen call against attention over
one sequence, MLPs in chunks, the head in fp32 against the model's head in its dtype), so their
log-probs differ by rounding: a few units of roundoff of the dtype (``u``: 2**-24 in float32,
2**-11 in float16, 2**-8 in bfloat16) carried through the model's depth and its head. Measured
with this probe on SmolLM2-135M (30 layers, one trace of 2,283 tokens; ``bench/proof_noise.py``,
docs/BENCHMARKS.md): float32 differs by at most 4.2e-5 and 1.4e-6 on average; bfloat16 by at most
0.19 to 0.40 (two runs) and 0.028 on average (the reference's logits are rounded to bfloat16
before its fp32 log-softmax, which alone moves a log-prob by up to ``2 * u * max|logit|``, about
0.12 for logits near 30). The tolerances leave a margin of about 24x on the largest and 36x on
the mean in float32, 5x on both in bfloat16, and take bfloat16's for float16 scaled by the ratio
of their roundoffs (1/8). What they catch is a different computation, not rounding: a sequence
that sees its pack mates (a leaking convolution or state) moves log-probs by hundredths of a nat
to nats, as a tiny random student whose MLPs mix in the previous position does
(tests/unit/score/test_proof.py). In bfloat16 a leak smaller than the tolerance is hidden by the
same rounding noise that bfloat16 adds to every score.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ln_ray.prepare.render import TokenizedTrace
from ln_ray.score.attention import plain_forward
from ln_ray.score.vetting import POSITIONWISE_LAYERS, StudentError, is_covered, model_type


@dataclass(frozen=True)
class Tolerance:
    """The largest per-token and mean log-prob differences allowed, in nats."""

    largest: float
    mean: float


TOLERANCES = {
    torch.float32: Tolerance(largest=1e-3, mean=5e-5),
    torch.bfloat16: Tolerance(largest=2.0, mean=0.15),
    torch.float16: Tolerance(largest=0.25, mean=0.02),
}
PROBE_SEED = 0
_LOGIT_CELLS = 1 << 27  # reference logits computed at once, at most (512 MB in float32)


class ProofError(StudentError):
    """The packed scorer does not reproduce the student's plain forward."""


@dataclass(frozen=True)
class Proof:
    """How a student was proven: the families the tests cover, and this actor's self-check.

    Attributes:
        model_type: The student's model type.
        covered_by_tests: Whether the equivalence tests cover its family.
        dtype: The dtype the student runs in.
        tolerance: The largest per-token log-prob difference allowed, in nats.
        max_difference: The largest difference the self-check found.
        mean_difference: The mean difference over the probe's log-probs.
        probe_tokens: Tokens in the probe's traces.
        sliding_window: The longest sliding window the student declares (the probe runs past
            it), or None.
        layers: Decoder layers whose attention the packed path ran.
    """

    model_type: str
    covered_by_tests: bool
    dtype: str
    tolerance: float
    max_difference: float
    mean_difference: float
    probe_tokens: int
    sliding_window: int | None
    layers: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prove_student(scorer: Any, name: str) -> Proof:
    """Score a probe with ``scorer`` and with plain forwards of its model; raise on a difference.

    Args:
        scorer: The ``StudentScorer`` the actor will score with (its counters are left as they
            were).
        name: The student, as the error names it.

    Returns:
        The proof, for the manifest.

    Raises:
        ProofError: The packed path fails on the probe, the log-probs differ by more than the
            dtype's tolerances (the largest difference, or the mean one), or a decoder layer's
            attention never ran in the packed path.
    """
    model = scorer.model
    param = next(model.parameters())
    dtype = str(param.dtype).removeprefix("torch.")
    tolerance = TOLERANCES.get(param.dtype, TOLERANCES[torch.float32])
    window = longest_sliding_window(model.config)
    traces = probe_traces(
        vocab=model.get_input_embeddings().num_embeddings,
        window=scorer.window,
        fraction=scorer.window_fraction,
        sliding_window=window if window is not None and window < scorer.max_tokens else None,
    )
    counters = scorer.model_tokens, dict(scorer.seconds)
    scorer.layers_attended.clear()
    try:
        fast = scorer.score(traces)
    except StudentError:
        raise
    except Exception as exc:  # an architecture the packed path cannot even run
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise ProofError(
            f"student {name!r} failed its self-check: the packed path cannot score it "
            f"({detail}): choose another student"
        ) from None
    finally:
        scorer.model_tokens, scorer.seconds = counters
    missing = sorted(attention_layers(model) - scorer.layers_attended)
    if missing:
        raise ProofError(
            f"student {name!r} failed its self-check: decoder layers {missing} never ran "
            "attention in the packed path, so they mix tokens some other way (a convolution, a "
            "recurrent or linear-attention layer) that leaks between packed sequences: choose "
            "another student"
        )
    differences, places = [], []
    with torch.inference_mode(), plain_forward(model):
        for i, (trace, scores) in enumerate(zip(traces, fast)):
            reference = reference_logprobs(
                model, trace, scorer.window, scorer.window_fraction, scorer.max_tokens
            )
            for kind, got, want in zip(
                ("global", "local"), (scores.global_logprobs, scores.local_logprobs), reference
            ):
                diff = np.abs(np.asarray(got, np.float64) - want)
                differences.append(np.where(np.isfinite(diff), diff, np.inf))
                places += [(kind, i, j, len(diff)) for j in range(len(diff))]
    diff = np.concatenate(differences)
    at = int(diff.argmax())
    largest, mean = float(diff[at]), float(diff.mean())
    if largest > tolerance.largest or mean > tolerance.mean:
        kind, i, j, n = places[at]
        raise ProofError(
            f"student {name!r} failed its self-check: the {kind} log-prob of probe trace {i}, "
            f"response token {j} of {n}, differs from a plain transformers forward by "
            f"{largest:.3g} (tolerance {tolerance.largest:g} in {dtype}; mean difference "
            f"{mean:.3g}, tolerance {tolerance.mean:g}): ln-ray's packed scoring does not "
            "reproduce this student, so nothing was scored: choose another student"
        )
    return Proof(
        model_type=model_type(model.config),
        covered_by_tests=is_covered(model.config),
        dtype=dtype,
        tolerance=tolerance.largest,
        max_difference=largest,
        mean_difference=mean,
        probe_tokens=sum(len(t.input_ids) for t in traces),
        sliding_window=window,
        layers=len(scorer.layers_attended),
    )


def longest_sliding_window(config: Any) -> int | None:
    """The longest sliding window any layer of the student uses, or None."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not isinstance(window, int) or window <= 0:
        return None
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def attention_layers(model: torch.nn.Module) -> set[int]:
    """The decoder layers that should run attention: all but the position-wise ones a hybrid
    config declares (``layer_types`` ``mlp`` or ``moe``, which mix no tokens)."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(model.base_model, "layers", None)
    count = len(layers) if layers is not None else int(config.num_hidden_layers)
    layer_types = list(getattr(config, "layer_types", None) or [])
    return {
        i
        for i in range(count)
        if i >= len(layer_types) or layer_types[i] not in POSITIONWISE_LAYERS
    }


def probe_traces(
    vocab: int, window: int, fraction: float | None, sliding_window: int | None
) -> list[TokenizedTrace]:
    """The probe: two short traces and, past ``sliding_window``, a long one (random tokens).

    The short traces have more steps than the window (so some windows attend to a recorded
    prefix), an empty step, and together more predictions than a head chunk on a CPU.
    """
    rng = np.random.default_rng(PROBE_SEED)
    steps = window + 3 if fraction is None else 6
    short = [
        (11, [28, 0, *[12 + (7 * i) % 25 for i in range(steps - 1)]]),
        (6, [16 + (5 * i) % 17 for i in range(steps - 1)]),
    ]
    if sliding_window is not None:
        step = math.ceil((sliding_window + 16) / max(1, window if fraction is None else 2))
        short.append((9, [step] * max(3, steps - 1)))
    traces = []
    for prefix, lengths in short:
        total = prefix + sum(lengths)
        ids = rng.integers(0, vocab, size=total, dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        traces.append(TokenizedTrace(input_ids=ids, prefix_len=prefix, step_bounds=bounds))
    return traces


def reference_logprobs(
    model: torch.nn.Module,
    trace: TokenizedTrace,
    window: int,
    fraction: float | None,
    max_tokens: int,
) -> tuple[np.ndarray, np.ndarray]:
    """A trace's global and local log-probs, each sequence its own plain forward.

    Returns:
        Float64 arrays: the global log-probs of the first ``max_tokens - prefix`` response
        tokens, and the local log-prob of every response token.
    """
    ids = trace.input_ids.tolist()
    p, bounds = trace.prefix_len, trace.step_bounds.tolist()
    n_response = len(ids) - p
    n_global = max(0, min(n_response, max_tokens - p))
    global_lp = _plain_logprobs(model, ids[: p + n_global], list(range(p - 1, p + n_global - 1)))
    local_lp = np.full(n_response, np.nan)
    for i in range(len(bounds) - 1):
        if bounds[i] == bounds[i + 1]:
            continue
        seen = window if fraction is None else math.ceil(fraction * i - 1e-9)
        first = bounds[max(0, i - seen)]
        sequence = ids[:p] + ids[p + first : p + bounds[i + 1]]
        predictors = [p + j - first - 1 for j in range(bounds[i], bounds[i + 1])]
        local_lp[bounds[i] : bounds[i + 1]] = _plain_logprobs(model, sequence, predictors)
    return global_lp, local_lp


def _plain_logprobs(model: torch.nn.Module, ids: list[int], predictors: list[int]) -> np.ndarray:
    """Log-probs of ``ids[q + 1]`` after position ``q``, for each ``q`` in ``predictors``."""
    if not predictors:
        return np.zeros(0)
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    per_call = max(1, _LOGIT_CELLS // int(model.get_output_embeddings().weight.shape[0]))
    out = []
    for a in range(0, len(predictors), per_call):
        rows = torch.tensor(predictors[a : a + per_call], device=device)
        logits = model(input_ids=tokens, logits_to_keep=rows, use_cache=False).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = tokens[0, rows + 1]
        out.append(logprobs.gather(1, targets[:, None])[:, 0].double().cpu().numpy())
    return np.concatenate(out)
