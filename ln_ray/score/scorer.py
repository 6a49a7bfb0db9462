"""StudentScorer: global and local log-probs, ranks and metrics for a batch of traces.

The scorer runs a plan (``planning.py``: which sequences, which predictions to keep) in two passes
over packs of sequences (``attention.py`` keeps a pack's sequences apart):

1. global: one sequence per trace, ``prefix + r_1..r_g`` (``g`` response tokens, capped by
   ``max_tokens``, by default the student's declared context); yields the global log-prob and
   rank of every scored response token, the local log-probs of the first ``k + 1`` steps (their
   windows are prefixes of this sequence), and records the chat prefix's keys/values and its last
   position's hidden state for phase 2;
2. local: the remaining windows (``windows.py``), each attending to its trace's recorded prefix,
   and (with an unconditional context, for IFD) each trace's globally scored response tokens
   after the context the student has with no prompt, packed with the windows.

Then ``metrics.py`` turns each trace's token log-probs into GALP, LALP, RSR, IFD and the rest.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
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
from ln_ray.score.chunking import chunk_mlps, set_mlp_chunk
from ln_ray.score.failures import is_out_of_memory
from ln_ray.score.logprobs import TokenHead
from ln_ray.score.metrics import trace_metrics
from ln_ray.score.planning import ScoredSequence, ScoringPlan, pack_sequences, plan_scoring
from ln_ray.score.transfer import to_device
from ln_ray.score.vector_math import settle_vector_math
from ln_ray.score.vetting import (
    check_scorable,
    check_structure,
    declared_context,
    resolve_global_cap,
)

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
    lalp_drop1: float
    lalp_token: float
    ifd: float
    ifd_ppl: float
    rsr: float
    avg_rank: float
    avg_surprisal: float
    step_logprobs: list[float | None]
    global_logprobs: np.ndarray
    global_ranks: np.ndarray
    local_logprobs: np.ndarray


@dataclass
class PackScores:
    """A pack's results, still on the device: its sequences' scored tokens, in order."""

    sequences: list[ScoredSequence]
    logprobs: torch.Tensor
    ranks: torch.Tensor | None


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
        prefix_budget: Prompt tokens whose keys and values are held at once: the global pass
            records each trace's prompt for its windows until the local pass ends, so a batch
            whose prompts add up to more is scored a group of traces at a time (a trace whose
            prompt alone is longer, alone).
        head_chunk: Rows per output-projection chunk; 0 picks by device (128 rows keep a CPU's
            logits in cache, 2048 fill a GPU).
        unconditional: The context the student has with no prompt
            (``render.unconditional_context``): each trace's response is also scored after it,
            for IFD. None: not (``ifd`` and ``ifd_ppl`` are NaN).

    On a CPU, creating a scorer also fixes glibc's allocator thresholds for the process
    (``allocator.keep_freed_memory``), so each layer reuses the memory the last one freed.

    Raises:
        StudentError: The student has a feature the packed scorer cannot reproduce exactly
            (``check_scorable``, ``check_structure``).
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
        prefix_budget: int = ComputeConfig.prefix_budget,
        head_chunk: int = ComputeConfig.head_chunk,
        unconditional: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        settle_vector_math()  # before the first multi-threaded cos of RoPE: see vector_math
        self.max_tokens = resolve_global_cap(declared_context(model), max_tokens)
        self.rope_limit = check_scorable(model.config, self.max_tokens)
        check_structure(model)
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
        self.prefix_budget = prefix_budget
        self.head_chunk = head_chunk or (128 if self.device.type == "cpu" else 2048)
        self.unconditional = (
            None if unconditional is None else np.asarray(unconditional, dtype=np.int64)
        )
        self.model_tokens = 0  # tokens run through the model so far (for throughput figures)
        self.on_pack: Callable[[int], None] | None = None  # told each pack's tokens when done
        self.layers_attended: set[int] = set()  # decoder layers whose attention ran a pack
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
        results: list[TraceScores] = []
        for group in prefix_groups([t.prefix_len for t in traces], self.prefix_budget):
            results += self._score_group(traces[group.start : group.stop])
        return results

    def _score_group(self, traces: Sequence[TokenizedTrace]) -> list[TraceScores]:
        """``score`` for traces whose prompts' keys and values are held at once."""
        plan = self.plan(traces)
        global_lp = [np.full(g, np.nan, dtype=np.float32) for g in plan.n_global]
        global_rank = [np.zeros(g, dtype=np.int64) for g in plan.n_global]
        local_lp = [np.full(t.n_response, np.nan, dtype=np.float32) for t in traces]
        unconditional: list[tuple[np.ndarray, int] | None] = [None] * len(traces)

        store = PrefixStore()
        started = time.perf_counter()
        for seq, lp, rank in self._run(plan.global_sequences, traces, store):
            global_lp[seq.trace][:] = lp
            global_rank[seq.trace][:] = rank
        for i, reused in enumerate(plan.reused):
            local_lp[i][:reused] = global_lp[i][:reused]
        between = time.perf_counter()
        local = plan.window_sequences + plan.unconditional_sequences
        for seq, lp, _ in self._run(local, traces, store):
            if seq.unconditional:
                unconditional[seq.trace] = (lp, seq.target_offset)
            else:
                local_lp[seq.trace][seq.target_offset : seq.target_offset + len(lp)] = lp
        store.clear()
        self.seconds["global"] += between - started
        self.seconds["local"] += time.perf_counter() - between

        results = []
        for i, trace in enumerate(traces):
            assert not np.isnan(local_lp[i]).any(), "a response token was never scored locally"
            assert not np.isnan(global_lp[i]).any(), "a response token was never scored globally"
            metrics = trace_metrics(
                global_lp[i],
                global_rank[i],
                local_lp[i],
                trace.step_bounds,
                self.rank_clip,
                unconditional[i],
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

    @contextlib.contextmanager
    def packs_of(self, token_budget: int) -> Iterator[None]:
        """Within the block, packs (and a long sequence's MLP chunks) hold at most
        ``token_budget`` tokens: less memory, for a trace that ran out of it."""
        kept = self.token_budget
        self.token_budget = token_budget
        set_mlp_chunk(self.model, token_budget)
        try:
            yield
        finally:
            self.token_budget = kept
            set_mlp_chunk(self.model, kept)

    def plan(self, traces: Sequence[TokenizedTrace]) -> ScoringPlan:
        """The sequences ``score(traces)`` runs, without running them (``planning.py``)."""
        return plan_scoring(
            traces,
            window=self.window,
            window_fraction=self.window_fraction,
            max_tokens=self.max_tokens,
            rope_limit=self.rope_limit,
            unconditional=self.unconditional,
        )

    def _run(
        self, sequences: list[ScoredSequence], traces: Sequence[TokenizedTrace], store: PrefixStore
    ):
        """Forward ``sequences`` in packs; yield ``(sequence, logprobs, ranks)`` for each.

        Every pack is queued before any result comes back to the host: on a GPU the host builds
        the next pack while the device computes the last, and waits once, for the whole pass.
        """
        prefix_lens = [t.prefix_len for t in traces]
        scored: list[PackScores] = []
        for pack in pack_sequences(sequences, self.token_budget, self.rope_limit):
            scored += self._score_pack([sequences[i] for i in pack], prefix_lens, store)
        if not scored:
            return
        logprobs = torch.cat([s.logprobs for s in scored]).cpu().numpy()
        ranks = None
        if scored[0].ranks is not None:
            ranks = torch.cat([s.ranks for s in scored]).cpu().numpy()  # type: ignore[misc]
        offset = 0
        for pack_scores in scored:
            for seq in pack_scores.sequences:
                n = len(seq.targets)
                yield (
                    seq,
                    logprobs[offset : offset + n],
                    None if ranks is None else ranks[offset : offset + n],
                )
                offset += n

    def _score_pack(
        self, pack: list[ScoredSequence], prefix_lens: list[int], store: PrefixStore
    ) -> list[PackScores]:
        """One pack; on out-of-memory, split it in halves and try again."""
        try:
            return [self._forward_pack(pack, prefix_lens, store)]
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if len(pack) == 1 or not is_out_of_memory(exc):
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(pack) // 2
        log.warning(
            "out of memory on a pack of %d tokens: splitting it in two",
            sum(len(s.tokens) for s in pack),
        )
        return self._score_pack(pack[:half], prefix_lens, store) + self._score_pack(
            pack[half:], prefix_lens, store
        )

    def _forward_pack(
        self, pack: list[ScoredSequence], prefix_lens: list[int], store: PrefixStore
    ) -> PackScores:
        segments, start = [], 0
        for seq in pack:
            segments.append(
                Segment(seq.trace, start, len(seq.tokens), seq.uses_prefix, seq.records_prefix_len)
            )
            start += len(seq.tokens)
        ids = to_device(np.concatenate([s.tokens for s in pack]), self.device)
        positions = to_device(packed_positions(segments, prefix_lens), self.device)
        targets = to_device(np.concatenate([s.targets for s in pack]), self.device)
        layout = PackedLayout(segments, store)
        with map_large_blocks(start > self.token_budget):  # a long sequence alone: see allocator
            hidden = self.body(
                input_ids=ids[None],
                position_ids=positions[None],
                use_cache=False,
                ln_layout=layout,
            ).last_hidden_state[0]
        self.layers_attended |= layout.attended
        predictors = []  # per sequence, the hidden states that predict its targets
        for seq, seg in zip(pack, segments):
            if seq.records_prefix_len:
                # A copy: a view would keep the whole pack's hidden states alive.
                last = seg.start + seq.records_prefix_len - 1
                store.hidden[seq.trace] = hidden[last][None].clone()
            n = len(seq.targets)
            if seq.first_predictor is None:
                own = hidden[seg.start : seg.start + n - 1]
                predictors.append(torch.cat([store.hidden[seq.trace], own]))
            else:
                first = seg.start + seq.first_predictor
                predictors.append(hidden[first : first + n])
        lp, rank = self.head.score(
            torch.cat(predictors), targets, with_rank=pack[0].is_global, chunk=self.head_chunk
        )
        self.model_tokens += start
        if self.on_pack is not None:
            self.on_pack(start)
        return PackScores(pack, lp, rank)


def prefix_groups(prefix_lens: Sequence[int], budget: int) -> list[range]:
    """Consecutive groups of traces whose prompts add up to at most ``budget`` tokens (a trace
    whose prompt alone is longer, alone)."""
    groups, start, held = [], 0, 0
    for i, length in enumerate(prefix_lens):
        if i > start and held + length > budget:
            groups.append(range(start, i))
            start, held = i, 0
        held += length
    if start < len(prefix_lens):
        groups.append(range(start, len(prefix_lens)))
    return groups
