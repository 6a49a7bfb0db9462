"""Progress of the scoring pass: traces and model tokens done out of the total, tokens/s and an
ETA from tokens.

The unit of work is the model token (what the student runs: each trace's prompt once and every
window, ``planning.py``). The tokenizing tasks tell a ``ProgressCounter`` actor the model tokens
each batch of traces will cost, so the total is known once tokenizing is done (and estimated from
the traces tokenized so far until then); the scoring actors tell it the tokens of each pack as it
finishes (at most once a second), and the traces and tokens of each batch when it ends. A thread
in the driver shows it every ``compute.progress_s`` seconds (``display.py``). The actors also tell
the counter their attention kernel and how their student was proven, and why the job must stop
when it must (a student that fails its self-check): the driver reads that reason, not a remote
traceback. This module imports nothing heavy: the counter actor's process loads only Ray and this
file.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Where the scoring pass stands.

    Attributes:
        traces: Traces whose batch has ended.
        tokens: Model tokens run: those of ended batches, and the packs done of the batches
            in flight.
        planned_traces: Traces tokenized so far.
        planned_tokens: The model tokens those will cost.
    """

    traces: int = 0
    tokens: int = 0
    planned_traces: int = 0
    planned_tokens: int = 0

    def total_tokens(self, total_traces: int) -> int | None:
        """The model tokens of all ``total_traces``: exact once all are tokenized, else
        estimated from those tokenized so far (None before any is)."""
        if not self.planned_traces:
            return None
        if self.planned_traces >= total_traces:
            return self.planned_tokens
        return round(self.planned_tokens * total_traces / self.planned_traces)


class ProgressCounter:
    """Traces and tokens scored so far: a Ray actor in the job, the scoring actors add to it."""

    def __init__(self) -> None:
        self.traces = 0
        self.tokens = 0
        self.in_flight: dict[str, int] = {}  # per scoring actor, the tokens of its batch so far
        self.planned_traces = 0
        self.planned_tokens = 0
        self.kernels: set[str] = set()
        self.proofs: list[dict[str, Any]] = []
        self.halted: str | None = None

    def plan(self, traces: int, tokens: int) -> None:
        self.planned_traces += traces
        self.planned_tokens += tokens

    def packs(self, actor: str, tokens: int) -> None:
        self.in_flight[actor] = tokens

    def add(self, traces: int, tokens: int, actor: str = "") -> None:
        self.traces += traces
        self.tokens += tokens
        self.in_flight.pop(actor, None)

    def snapshot(self) -> Progress:
        return Progress(
            self.traces,
            self.tokens + sum(self.in_flight.values()),
            self.planned_traces,
            self.planned_tokens,
        )

    def add_kernel(self, kernel: str) -> None:
        self.kernels.add(kernel)

    def attention(self) -> list[str]:
        """The attention kernels the scoring actors run (one, unless the nodes differ)."""
        return sorted(self.kernels)

    def add_proof(self, proof: dict[str, Any]) -> None:
        self.proofs.append(proof)

    def proven(self) -> list[dict[str, Any]]:
        """Every scoring actor's proof of its student (``score/proof.Proof``)."""
        return list(self.proofs)

    def halt(self, reason: str) -> None:
        if self.halted is None:
            self.halted = reason

    def halt_reason(self) -> str | None:
        """Why a scoring actor stopped the job, if one did."""
        return self.halted


class ProgressReport:
    """What a tokenizing task holds to report the work it planned (``plan(traces, tokens)``),
    and a scoring actor to report its packs (``packs(tokens)``: the model tokens of its batch so
    far, sent at most every ``PACK_REPORT_S``) and batches (``add(traces, tokens)``), its
    attention kernel (``kernel(name)``), its student's proof (``proof(record)``) and why the job
    must stop (``halt(reason)``)."""

    PACK_REPORT_S = 1.0

    def __init__(self, counter: Any) -> None:
        self._counter = counter
        self._sent = 0.0

    def plan(self, traces: int, tokens: int) -> None:
        self._counter.plan.remote(traces, tokens)

    def packs(self, tokens: int) -> None:
        now = time.monotonic()
        if now - self._sent >= self.PACK_REPORT_S:
            self._sent = now
            self._counter.packs.remote(_actor(), tokens)

    def add(self, traces: int, tokens: int) -> None:
        self._counter.add.remote(traces, tokens, _actor())

    def kernel(self, kernel: str) -> None:
        self._counter.add_kernel.remote(kernel)

    def proof(self, record: dict[str, Any]) -> None:
        self._counter.add_proof.remote(record)

    def halt(self, reason: str) -> None:
        import ray

        ray.get(self._counter.halt.remote(reason))  # recorded before the actor fails


def _actor() -> str:
    """The calling actor's id (the same after Ray restarts it, so its batch in flight is
    replaced, not counted twice)."""
    import ray

    return ray.get_runtime_context().get_actor_id() or ""


def progress_line(progress: Progress, total: int, seconds: float) -> str:
    """One progress line: traces done of the total, model tokens done of theirs, tokens/s and
    the time left (from tokens)."""
    tokens, planned, rate, left = _pace(progress, total, seconds)
    share = progress.traces / total if total else 1.0
    of = "" if planned is None else f" of {planned:,}"
    if planned is not None and progress.planned_traces < total:
        of = f" of about {planned:,}"
    if progress.traces >= total:
        left = "done"
    return (
        f"scoring: {progress.traces:,} of {total:,} traces ({share:.0%}), "
        f"{tokens:,}{of} model tokens, {rate:,.0f} tokens/s, {duration(seconds)} elapsed, "
        f"{left}"
    )


def _pace(progress: Progress, total: int, seconds: float) -> tuple[int, int | None, float, str]:
    """Model tokens done, their total (None before any trace is planned), tokens/s and the time
    left from tokens (``ETA -`` until there is a rate and a total)."""
    tokens, planned = progress.tokens, progress.total_tokens(total)
    rate = tokens / seconds if seconds > 0 else 0.0
    left = "ETA -"
    if rate and planned is not None:
        left = f"ETA {duration(max(planned - tokens, 0) / rate)}"
    return tokens, planned, rate, left


def status_text(progress: Progress, total: int, seconds: float) -> str:
    """The progress in a terminal's status line: traces, model tokens (the share of the work
    done), tokens/s and the time left."""
    tokens, planned, rate, left = _pace(progress, total, seconds)
    work = f"{tokens:,} model tokens"
    if planned:
        about = "~" if progress.planned_traces < total else ""
        work = f"{tokens:,}/{about}{planned:,} model tokens ({min(tokens / planned, 1):.0%})"
    return f"{progress.traces:,}/{total:,} traces, {work}, {rate:,.0f} tokens/s, {left}"


def report_progress(
    counter: Any,
    total: int,
    started: float,
    done: threading.Event,
    interval: float,
    show: Any = None,
    render: Any = progress_line,
) -> None:
    """Until ``done``: every ``interval`` seconds, the counter's progress as ``render`` writes
    it (``progress_line``) to ``show`` (the log by default)."""
    import ray

    show = show or log.info
    while not done.wait(interval):
        try:
            progress = ray.get(counter.snapshot.remote(), timeout=max(interval, 1.0))
        except Exception as exc:  # a missed report is no reason to stop the run
            log.debug("no progress report: %s", exc)
            continue
        show(render(progress, total, time.time() - started))


def duration(seconds: float) -> str:
    """``seconds`` as ``4m05s`` or ``2h13m``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
