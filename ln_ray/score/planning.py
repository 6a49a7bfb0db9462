"""Which sequences one scoring call runs, which of their predictions it keeps, and how they pack.

Pure NumPy: a plan is decided from token ids and step boundaries alone, before any model runs, so
it can be tested (and costed, by ``ln-ray plan``) without a student.

Three words keep apart what could all be called a "row":

- a *sequence* is one run of tokens with its own causal attention: a trace's global sequence
  ``prefix + r_1..r_g``, one local window, or (for IFD) its unconditional sequence
  ``U + r_1..r_g``, the same response tokens after the context ``U`` the student has with no
  prompt;
- a *pack* is several sequences laid end to end and run as one forward call of at most
  ``token_budget`` tokens (``attention.py`` keeps them apart inside it);
- a *position* is a token's place in a sequence. The hidden state at position ``q`` predicts the
  token at ``q + 1``, so a sequence's scored tokens (its ``targets``) are predicted by the
  positions just before them:

    sequence:  x_0 ... x_{P-1} | r_1      r_2    ...  r_g
    position:  0   ... P-1     | P        P+1    ...  P+g-1 (predicts nothing)
    predicts:  x_1 ... r_1     | r_2      r_3    ...

  For a global sequence with prefix length ``P`` the first predictor is ``P - 1``. A window that
  attends to its trace's recorded prefix instead of carrying it predicts its first scored token
  from the prefix's last position, which only the global sequence ran: its ``first_predictor`` is
  None and the scorer takes that hidden state from the prefix store.

(A table row, in the pipeline's sense, never appears here.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ln_ray.config import ScoringConfig
from ln_ray.prepare.render import TokenizedTrace
from ln_ray.score.windows import WindowSpan, plan_windows


@dataclass
class ScoredSequence:
    """A sequence to run through the model and which of its predictions to keep.

    Attributes:
        trace: Index of the trace in the scoring call.
        tokens: The sequence's own token ids (without the recorded prefix it may attend to).
        uses_prefix: Attend to the trace's recorded prefix keys/values before its own tokens.
        records_prefix_len: How many leading tokens are recorded as the trace's prefix, for the
            windows that use it (0: none).
        first_predictor: Position in ``tokens`` whose hidden state predicts ``targets[0]``; None
            when it is the recorded prefix's last position (a window with no context steps).
        targets: The scored token ids, in order; ``targets[j]`` is predicted by the position
            after the one predicting ``targets[j - 1]``.
        target_offset: Response index of ``targets[0]``.
        is_global: Part of the global pass (whose token ranks are kept).
        unconditional: The trace's unconditional sequence (IFD's response given no prompt).
    """

    trace: int
    tokens: np.ndarray
    uses_prefix: bool
    records_prefix_len: int
    first_predictor: int | None
    targets: np.ndarray
    target_offset: int
    is_global: bool
    unconditional: bool = False


@dataclass
class ScoringPlan:
    """What one ``score`` call runs: the global pass, then the local windows.

    Attributes:
        n_global: Per trace, how many leading response tokens the global pass scores.
        reused: Per trace, how many leading response tokens take their local log-prob from the
            global pass (their windows are prefixes of the global sequence).
        global_sequences: One per trace, ``prefix + r_1..r_g``.
        window_sequences: Every other window, without the prefix (it attends to the recorded one).
        unconditional_sequences: With an unconditional context, one per trace that has a
            response token to score after it (``unconditional_sequence``).
        model_tokens: Per trace, the tokens it runs through the model: prefix once, every
            window, its unconditional sequence.
    """

    n_global: list[int]
    reused: list[int]
    global_sequences: list[ScoredSequence]
    window_sequences: list[ScoredSequence]
    unconditional_sequences: list[ScoredSequence]
    model_tokens: list[int]


def plan_scoring(
    traces: Sequence[TokenizedTrace],
    *,
    window: int,
    window_fraction: float | None,
    max_tokens: int,
    rope_limit: int | None,
    unconditional: np.ndarray | None = None,
) -> ScoringPlan:
    """The sequences that score ``traces``, globally and locally (and, given the unconditional
    context, with no prompt).

    Args:
        traces: Tokenized traces.
        window: Local window ``k`` in steps.
        window_fraction: If set, each step sees this fraction of its preceding steps instead.
        max_tokens: Cap on a global sequence (prefix + response).
        rope_limit: Length past which the student's RoPE frequencies change with the sequence's
            length (``vetting.check_scorable``); None when they never do.
        unconditional: The context the student has with no prompt
            (``render.unconditional_context``); None: no unconditional sequences (no IFD).

    Returns:
        The plan; every response token is scored globally (up to the cap) and locally exactly
        once, by ``reused`` or by one window sequence.
    """
    n_global = [global_tokens(t, max_tokens) for t in traces]
    windows = [
        plan_windows(
            t.step_bounds,
            window,
            window_fraction,
            g,
            None if rope_limit is None else rope_limit - t.prefix_len,
        )
        for t, g in zip(traces, n_global)
    ]
    globals_ = [
        global_sequence(i, t, g, records_prefix=bool(spans))
        for i, (t, g, (_, spans)) in enumerate(zip(traces, n_global, windows))
    ]
    windows_ = [
        window_sequence(i, traces[i], span, rope_limit)
        for i, (_, spans) in enumerate(windows)
        for span in spans
    ]
    unconditional_ = []
    if unconditional is not None:
        for i, (t, g) in enumerate(zip(traces, n_global)):
            seq = unconditional_sequence(i, t, g, unconditional, max_tokens)
            if seq is not None:
                unconditional_.append(seq)
    model_tokens = [len(seq.tokens) for seq in globals_]
    for seq in windows_ + unconditional_:
        model_tokens[seq.trace] += len(seq.tokens)
    return ScoringPlan(
        n_global=n_global,
        reused=[reused for reused, _ in windows],
        global_sequences=globals_,
        window_sequences=windows_,
        unconditional_sequences=unconditional_,
        model_tokens=model_tokens,
    )


def plan_scorable(
    traces: Sequence[TokenizedTrace],
    scoring: ScoringConfig,
    *,
    max_tokens: int,
    rope_limit: int | None,
    unconditional: np.ndarray | None,
) -> ScoringPlan:
    """``plan_scoring`` with ``scoring``'s windows, over the traces whose prompt fits
    ``max_tokens`` (the others are rejected, and cost nothing): what the job's progress total
    and ``ln-ray plan`` count."""
    return plan_scoring(
        [t for t in traces if t.prefix_len < max_tokens],
        window=scoring.window,
        window_fraction=scoring.window_fraction,
        max_tokens=max_tokens,
        rope_limit=rope_limit,
        unconditional=unconditional,
    )


def global_tokens(trace: TokenizedTrace, max_tokens: int) -> int:
    """How many response tokens the global pass scores: the prefix always runs whole (windows
    need its keys/values), so the cap falls on the response."""
    return max(0, min(trace.n_response, max_tokens - trace.prefix_len))


def global_sequence(
    index: int, trace: TokenizedTrace, n_global: int, records_prefix: bool
) -> ScoredSequence:
    """The trace's global sequence ``prefix + r_1..r_g``; it records the prefix for the windows
    when ``records_prefix`` (some window of the trace attends to it)."""
    p = trace.prefix_len
    return ScoredSequence(
        trace=index,
        tokens=trace.input_ids[: p + n_global],
        uses_prefix=False,
        records_prefix_len=p if records_prefix else 0,
        first_predictor=p - 1,
        targets=trace.input_ids[p : p + n_global],
        target_offset=0,
        is_global=True,
    )


def unconditional_sequence(
    index: int, trace: TokenizedTrace, n_global: int, context: np.ndarray, max_tokens: int
) -> ScoredSequence | None:
    """The trace's response given no prompt, for IFD: ``context + r_1..r_n``, the first of the
    response tokens the global pass scores (all ``n_global`` of them unless the context is
    longer than the prompt and the cap falls earlier).

    With no context at all, nothing predicts ``r_1``: it is left out (``target_offset`` 1), and
    IFD compares the two passes over ``r_2..r_n``. None when no token is left to score.
    """
    c = len(context)
    n = max(0, min(n_global, max_tokens - c))
    offset = 0 if c else 1
    if n <= offset:
        return None
    p = trace.prefix_len
    return ScoredSequence(
        trace=index,
        tokens=np.concatenate([context.astype(trace.input_ids.dtype), trace.input_ids[p : p + n]]),
        uses_prefix=False,
        records_prefix_len=0,
        first_predictor=c - 1 if c else 0,
        targets=trace.input_ids[p + offset : p + n],
        target_offset=offset,
        is_global=False,
        unconditional=True,
    )


def window_sequence(
    index: int, trace: TokenizedTrace, span: WindowSpan, rope_limit: int | None
) -> ScoredSequence:
    """One local window: its context steps and scored tokens, attending to the recorded prefix.

    Past ``rope_limit`` the student's RoPE frequencies depend on the sequence's length, so such a
    window (a single step's, see ``plan_windows``) cannot reuse a prefix run at another length: it
    carries its own copy of the prefix and runs in a pack of its own (``pack_sequences``).
    """
    p = trace.prefix_len
    context = trace.input_ids[p + span.context_start : p + span.stop]
    targets = trace.input_ids[p + span.score_start : p + span.stop]
    first = span.score_start - span.context_start - 1  # -1: the prefix's last position
    if rope_limit is not None and p + span.length > rope_limit:
        return ScoredSequence(
            trace=index,
            tokens=np.concatenate([trace.input_ids[:p], context]),
            uses_prefix=False,
            records_prefix_len=0,
            first_predictor=p + first,
            targets=targets,
            target_offset=span.score_start,
            is_global=False,
        )
    return ScoredSequence(
        trace=index,
        tokens=context,
        uses_prefix=True,
        records_prefix_len=0,
        first_predictor=first if first >= 0 else None,
        targets=targets,
        target_offset=span.score_start,
        is_global=False,
    )


def pack_sequences(
    sequences: Sequence[ScoredSequence], token_budget: int, rope_limit: int | None
) -> list[list[int]]:
    """Packs of indices into ``sequences`` (``pack_by_budget``); a sequence past ``rope_limit``
    would change its pack mates' RoPE frequencies, so it is packed as longer than the budget,
    which gives it a pack of its own."""
    lengths = [len(s.tokens) for s in sequences]
    if rope_limit is not None:
        lengths = [n if n <= rope_limit else token_budget + n for n in lengths]
    return pack_by_budget(lengths, token_budget)


def pack_by_budget(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group sequence indices into packs of at most ``budget`` tokens, with no padding.

    Sequences are taken longest first (ties by index, so packing is deterministic), which puts the
    largest pack first: an out-of-memory error shows at once, not an hour into a run. A sequence
    longer than the budget gets a pack of its own.

    Args:
        lengths: Token count of each sequence.
        budget: Maximum tokens per pack.

    Returns:
        Packs of indices into ``lengths``; every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    used = 0
    for index in order:
        size = lengths[index]
        if packs and used + size <= budget:
            packs[-1].append(index)
            used += size
        else:
            packs.append([index])
            used = size
    return packs
