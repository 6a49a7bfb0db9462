"""Progress of the scoring pass: traces and tokens done out of the total, tokens/s and an ETA.

The scoring actors add to a ``ProgressCounter`` actor after each batch; a thread in the driver
logs a line from it every ``compute.progress_s`` seconds. The actors also tell it their attention
kernel and how their student was proven, and why the job must stop when it must (a student that
fails its self-check): the driver reads that reason, not a remote traceback. This module imports
nothing heavy: the counter actor's process loads only Ray and this file.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


class ProgressCounter:
    """Traces and tokens scored so far: a Ray actor in the job, the scoring actors add to it."""

    def __init__(self) -> None:
        self.traces = 0
        self.tokens = 0
        self.kernels: set[str] = set()
        self.proofs: list[dict[str, Any]] = []
        self.halted: str | None = None

    def add(self, traces: int, tokens: int) -> None:
        self.traces += traces
        self.tokens += tokens

    def snapshot(self) -> tuple[int, int]:
        return self.traces, self.tokens

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
    """What a scoring actor holds to report its batches (``add(traces, tokens)``), its
    attention kernel (``kernel(name)``), its student's proof (``proof(record)``) and why the job
    must stop (``halt(reason)``)."""

    def __init__(self, counter: Any) -> None:
        self._counter = counter

    def add(self, traces: int, tokens: int) -> None:
        self._counter.add.remote(traces, tokens)

    def kernel(self, kernel: str) -> None:
        self._counter.add_kernel.remote(kernel)

    def proof(self, record: dict[str, Any]) -> None:
        self._counter.add_proof.remote(record)

    def halt(self, reason: str) -> None:
        import ray

        ray.get(self._counter.halt.remote(reason))  # recorded before the actor fails


def progress_line(traces: int, total: int, tokens: int, seconds: float) -> str:
    """One progress line: traces done of the total, tokens, tokens/s and the time left."""
    rate = traces / seconds if seconds > 0 else 0.0
    left = f"ETA {_duration((total - traces) / rate)}" if rate and traces < total else "ETA -"
    share = traces / total if total else 1.0
    return (
        f"scoring: {traces:,} of {total:,} traces ({share:.0%}), {tokens:,} tokens, "
        f"{tokens / max(seconds, 1e-9):,.0f} tokens/s, {_duration(seconds)} elapsed, {left}"
    )


def report_progress(
    counter: Any, total: int, started: float, done: threading.Event, interval: float
) -> None:
    import ray

    while not done.wait(interval):
        try:
            traces, tokens = ray.get(counter.snapshot.remote(), timeout=interval)
        except Exception as exc:  # a missed report is no reason to stop the run
            log.debug("no progress report: %s", exc)
            continue
        log.info(progress_line(traces, total, tokens, time.time() - started))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
