"""StudentScorer: global and local log-probs, ranks and metrics for a batch of traces.

One call runs two phases over packed rows (see ``attention.py`` for the packing):

1. global: one sequence per trace, ``prefix + r_1..r_g`` (``g`` response tokens, capped by
   ``max_tokens``, by default the student's declared context); yields the global log-prob and
   rank of every scored response token, the local log-probs of the first ``k + 1`` steps (their
   windows are prefixes of this sequence), and records the chat prefix's keys/values for phase 2;
2. local: the remaining windows (``windows.py``), each attending to its trace's recorded prefix.

Hidden state row ``t`` predicts token ``t + 1``. For a sequence ``x_0..x_{L-1}`` with prefix length
``P`` the response token ``r_j = x_{P+j-1}`` is predicted by row ``P + j - 2``:

    tokens:  x_0 ... x_{P-1} | r_1     r_2   ...  r_g
    rows:    h_0 ... h_{P-1} | h_P     h_{P+1} ... (last row predicts nothing)
    predicts:x_1 ... r_1     | r_2     r_3   ...

so the scored rows are ``P-1 .. P+g-2``. A window starting at response token ``c`` (positions
``P + c ..``) predicts its first token from the prefix's last row ``h_{P-1}``, also recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ln_ray.config import ComputeConfig, ScoringConfig
from ln_ray.prepare.render import TokenizedTrace
from ln_ray.score.allocator import keep_freed_memory, map_large_blocks
from ln_ray.score.attention import (
    PackedLayout,
    PrefixStore,
    Segment,
    install_segment_attention,
    packed_positions,
)
from ln_ray.score.chunking import chunk_mlps
from ln_ray.score.logprobs import TokenHead
from ln_ray.score.metrics import trace_metrics
from ln_ray.score.packing import pack_by_budget
from ln_ray.score.transfer import to_device
from ln_ray.score.vector_math import settle_vector_math
from ln_ray.score.vetting import check_scorable, declared_context, resolve_global_cap
from ln_ray.score.windows import plan_windows

log = logging.getLogger(__name__)


@dataclass
class TraceScores:
    """Everything the student says about one trace."""

    n_tokens: int
    n_steps: int
    truncated: bool
    model_tokens: int  # tokens this trace ran through the model (prefix once, plus every window)
    galp: float
    lalp: float
    lalp_token: float
    rsr: float
    avg_rank: float
    avg_surprisal: float
    step_logprobs: list[float | None]
    global_logprobs: np.ndarray
    global_ranks: np.ndarray
    local_logprobs: np.ndarray


@dataclass
class ScoredSequence:
    """A sequence to run through the model and which of its predictions to keep."""

    trace: int
    tokens: np.ndarray
    uses_prefix: bool
    records_prefix: int
    first_row: int  # row predicting the first scored token; -1: the prefix's last row
    targets: np.ndarray
    target_offset: int  # response index of the first scored token
    is_global: bool


@dataclass
class RowScores:
    """A packed row's results, still on the device: its sequences' scored tokens, in order."""

    sequences: list[ScoredSequence]
    logprobs: torch.Tensor
    ranks: torch.Tensor | None


@dataclass
class ScoringPlan:
    """What one ``score`` call runs: the global pass, then the local windows.

    Attributes:
        n_global: Per trace, how many leading response tokens the global pass scores.
        reused: Per trace, how many leading response tokens take their local log-prob from the
            global pass (their windows are prefixes of the global sequence).
        global_sequences: One per trace, ``prefix + r_1..r_g``.
        window_sequences: Every other window, without the prefix (it attends to the recorded one).
        model_tokens: Per trace, the tokens it runs through the model: prefix once, every window.
    """

    n_global: list[int]
    reused: list[int]
    global_sequences: list[ScoredSequence]
    window_sequences: list[ScoredSequence]
    model_tokens: list[int]


class StudentScorer:
    """Scores tokenized traces with a student causal LM, exactly and in packed batches.

    Args:
        model: A transformers causal LM (its attention is switched to the packed kernel).
        window: Local window ``k`` in steps.
        window_fraction: If set, each step sees this fraction of its preceding steps instead.
        rank_clip: ``r_max`` for RSR and avg_rank.
        max_tokens: Cap on the global sequence (prefix + response); longer traces are truncated
            there for the global metrics and flagged, their local scores still cover every step.
            None takes the student's declared context (``declared_context``): past it, a
            student's log-probs are extrapolation, not a judgement of the text.
        token_budget: Tokens per packed forward pass; a longer global sequence runs alone, its
            MLPs a budget of tokens at a time.
        head_chunk: Rows per output-projection chunk; 0 picks by device (128 rows keep a CPU's
            logits in cache, 2048 fill a GPU).

    On a CPU, creating a scorer also fixes glibc's allocator thresholds for the process
    (``allocator.keep_freed_memory``), so each layer reuses the memory the last one freed.

    Raises:
        StudentError: The student has a feature the packed scorer cannot reproduce exactly
            (``check_scorable``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        window: int = ScoringConfig.window,
        window_fraction: float | None = ScoringConfig.window_fraction,
        rank_clip: int = ScoringConfig.rank_clip,
        max_tokens: int | None = None,
        token_budget: int = ComputeConfig.token_budget,
        head_chunk: int = ComputeConfig.head_chunk,
    ) -> None:
        settle_vector_math()  # before the first multi-threaded cos of RoPE: see vector_math
        self.max_tokens = resolve_global_cap(declared_context(model), max_tokens)
        self.rope_limit = check_scorable(model.config, self.max_tokens)
        install_segment_attention(model)
        chunk_mlps(model, token_budget)
        self.model = model
        self.body = model.base_model
        self.head = TokenHead(model)
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            keep_freed_memory()
        self.window = window
        self.window_fraction = window_fraction
        self.rank_clip = rank_clip
        self.token_budget = token_budget
        self.head_chunk = head_chunk or (128 if self.device.type == "cpu" else 2048)
        self.model_tokens = 0  # tokens run through the model so far (for throughput figures)
        self.seconds = {"global": 0.0, "local": 0.0}  # time spent in each pass so far

    def reject_reason(self, prefix_len: int) -> str | None:
        """Why a trace whose chat prefix has ``prefix_len`` tokens cannot be scored, or None.

        A prompt that fills the global cap leaves no response token to score globally: GALP,
        RSR and avg_rank would be NaN and the trace would drop out of their selections unseen.
        Such rows belong in ``rejects/`` with this reason (the same for every row of a run).
        """
        if prefix_len >= self.max_tokens:
            return f"prompt longer than scoring.max_tokens ({self.max_tokens} tokens)"
        return None

    @torch.inference_mode()
    def score(self, traces: Sequence[TokenizedTrace]) -> list[TraceScores]:
        """Score every trace; the result is in input order and independent of batching.

        Args:
            traces: Tokenized traces; one whose ``reject_reason`` is set gets NaN global metrics.

        Returns:
            One TraceScores per trace.
        """
        unscorable = sum(self.reject_reason(t.prefix_len) is not None for t in traces)
        if unscorable:
            log.warning(
                "%d traces have a prompt of %d tokens or more: no global scores (reject them)",
                unscorable,
                self.max_tokens,
            )
        plan = self.plan(traces)
        global_lp = [np.full(g, np.nan, dtype=np.float32) for g in plan.n_global]
        global_rank = [np.zeros(g, dtype=np.int64) for g in plan.n_global]
        local_lp = [np.full(t.n_response, np.nan, dtype=np.float32) for t in traces]

        store = PrefixStore()
        started = time.perf_counter()
        for seq, lp, rank in self._run(plan.global_sequences, traces, store):
            global_lp[seq.trace][:] = lp
            global_rank[seq.trace][:] = rank
        for i, reused in enumerate(plan.reused):
            local_lp[i][:reused] = global_lp[i][:reused]
        between = time.perf_counter()
        for seq, lp, _ in self._run(plan.window_sequences, traces, store):
            local_lp[seq.trace][seq.target_offset : seq.target_offset + len(lp)] = lp
        store.clear()
        self.seconds["global"] += between - started
        self.seconds["local"] += time.perf_counter() - between

        results = []
        for i, trace in enumerate(traces):
            assert not np.isnan(local_lp[i]).any(), "a response token was never scored locally"
            assert not np.isnan(global_lp[i]).any(), "a response token was never scored globally"
            metrics = trace_metrics(
                global_lp[i], global_rank[i], local_lp[i], trace.step_bounds, self.rank_clip
            )
            results.append(
                TraceScores(
                    n_tokens=trace.n_response,
                    n_steps=trace.n_steps,
                    truncated=plan.n_global[i] < trace.n_response,
                    model_tokens=plan.model_tokens[i],
                    global_logprobs=global_lp[i],
                    global_ranks=global_rank[i],
                    local_logprobs=local_lp[i],
                    **metrics,  # type: ignore[arg-type]
                )
            )
        return results

    def plan(self, traces: Sequence[TokenizedTrace]) -> ScoringPlan:
        """The sequences ``score(traces)`` runs, without running them."""
        n_global = [self._global_tokens(t) for t in traces]
        windows = [
            plan_windows(
                t.step_bounds,
                self.window,
                self.window_fraction,
                g,
                None if self.rope_limit is None else self.rope_limit - t.prefix_len,
            )
            for t, g in zip(traces, n_global)
        ]
        globals_ = [
            self._global_sequence(i, t, g, needs_prefix=bool(windows[i][1]))
            for i, (t, g) in enumerate(zip(traces, n_global))
        ]
        plan = ScoringPlan(
            n_global=n_global,
            reused=[reused for reused, _ in windows],
            global_sequences=globals_,
            window_sequences=[
                self._window_sequence(i, traces[i], span)
                for i, (_, spans) in enumerate(windows)
                for span in spans
            ],
            model_tokens=[len(seq.tokens) for seq in globals_],
        )
        for seq in plan.window_sequences:
            plan.model_tokens[seq.trace] += len(seq.tokens)
        return plan

    def _global_tokens(self, trace: TokenizedTrace) -> int:
        # The prefix always runs whole (windows need its keys/values); responses are capped.
        return max(0, min(trace.n_response, self.max_tokens - trace.prefix_len))

    def _global_sequence(
        self, index: int, trace: TokenizedTrace, n_global: int, needs_prefix: bool
    ) -> ScoredSequence:
        p = trace.prefix_len
        return ScoredSequence(
            trace=index,
            tokens=trace.input_ids[: p + n_global],
            uses_prefix=False,
            records_prefix=p if needs_prefix else 0,
            first_row=p - 1,
            targets=trace.input_ids[p : p + n_global],
            target_offset=0,
            is_global=True,
        )

    def _window_sequence(self, index: int, trace: TokenizedTrace, span) -> ScoredSequence:
        p = trace.prefix_len
        if self.rope_limit is not None and p + span.length > self.rope_limit:
            # Past the limit the student's RoPE frequencies depend on the sequence's length, so
            # this window (a single step's, see ``plan_windows``) cannot reuse a prefix run at
            # another length: it runs as its own sequence, prefix included, in a row of its own.
            return ScoredSequence(
                trace=index,
                tokens=np.concatenate(
                    [trace.input_ids[:p], trace.input_ids[p + span.context_start : p + span.stop]]
                ),
                uses_prefix=False,
                records_prefix=0,
                first_row=p + span.score_start - span.context_start - 1,
                targets=trace.input_ids[p + span.score_start : p + span.stop],
                target_offset=span.score_start,
                is_global=False,
            )
        return ScoredSequence(
            trace=index,
            tokens=trace.input_ids[p + span.context_start : p + span.stop],
            uses_prefix=True,
            records_prefix=0,
            first_row=span.score_start - span.context_start - 1,
            targets=trace.input_ids[p + span.score_start : p + span.stop],
            target_offset=span.score_start,
            is_global=False,
        )

    def _run(
        self, sequences: list[ScoredSequence], traces: Sequence[TokenizedTrace], store: PrefixStore
    ):
        """Forward packed rows of ``sequences``; yield ``(sequence, logprobs, ranks)`` for each.

        Every row is queued before any result comes back to the host: on a GPU the host builds
        the next row while the device computes the last, and waits once, for the whole pass.
        """
        prefix_lens = [t.prefix_len for t in traces]
        lengths = [len(s.tokens) for s in sequences]
        if self.rope_limit is not None:
            # A sequence past the RoPE limit would change its row mates' frequencies: packing
            # it as longer than the budget gives it a row of its own.
            lengths = [n if n <= self.rope_limit else self.token_budget + n for n in lengths]
        rows: list[RowScores] = []
        for row in pack_by_budget(lengths, self.token_budget):
            rows += self._score_row([sequences[i] for i in row], prefix_lens, store)
        if not rows:
            return
        logprobs = torch.cat([row.logprobs for row in rows]).cpu().numpy()
        ranks = None
        if rows[0].ranks is not None:
            ranks = torch.cat([row.ranks for row in rows]).cpu().numpy()  # type: ignore[misc]
        offset = 0
        for row in rows:
            for seq in row.sequences:
                n = len(seq.targets)
                yield (
                    seq,
                    logprobs[offset : offset + n],
                    None if ranks is None else ranks[offset : offset + n],
                )
                offset += n

    def _score_row(
        self, batch: list[ScoredSequence], prefix_lens: list[int], store: PrefixStore
    ) -> list[RowScores]:
        """One packed row; on out-of-memory, split it in halves and try again."""
        try:
            return [self._forward_row(batch, prefix_lens, store)]
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if len(batch) == 1 or not _is_out_of_memory(exc):
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(batch) // 2
        log.warning(
            "out of memory on a row of %d tokens: splitting it in two",
            sum(len(s.tokens) for s in batch),
        )
        return self._score_row(batch[:half], prefix_lens, store) + self._score_row(
            batch[half:], prefix_lens, store
        )

    def _forward_row(
        self, batch: list[ScoredSequence], prefix_lens: list[int], store: PrefixStore
    ) -> RowScores:
        segments, start = [], 0
        for seq in batch:
            segments.append(
                Segment(seq.trace, start, len(seq.tokens), seq.uses_prefix, seq.records_prefix)
            )
            start += len(seq.tokens)
        ids = to_device(np.concatenate([s.tokens for s in batch]), self.device)
        positions = to_device(packed_positions(segments, prefix_lens), self.device)
        targets = to_device(np.concatenate([s.targets for s in batch]), self.device)
        with map_large_blocks(start > self.token_budget):  # a long sequence alone: see allocator
            hidden = self.body(
                input_ids=ids[None],
                position_ids=positions[None],
                use_cache=False,
                ln_layout=PackedLayout(segments, store),
            ).last_hidden_state[0]
        rows = []
        for seq, seg in zip(batch, segments):
            if seq.records_prefix:
                # A copy: a view would keep the whole row's hidden states alive.
                store.hidden[seq.trace] = hidden[seg.start + seq.records_prefix - 1][None].clone()
            n = len(seq.targets)
            if seq.first_row >= 0:
                first = seg.start + seq.first_row
                rows.append(hidden[first : first + n])
            else:
                rows.append(
                    torch.cat([store.hidden[seq.trace], hidden[seg.start : seg.start + n - 1]])
                )
        lp, rank = self.head.score(
            torch.cat(rows), targets, with_rank=batch[0].is_global, chunk=self.head_chunk
        )
        self.model_tokens += start
        return RowScores(batch, lp, rank)


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc).lower()
    return "out of memory" in message or "not enough memory" in message
