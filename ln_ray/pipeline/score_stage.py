"""The scoring stage of the job, run in an actor pool (no Ray import).

``ScoreStage`` is built once per actor: it loads the student, checks that it is the one the
driver checked, and proves it on a probe (``score/proof.py``) before its first batch. Then
``__call__(batch) -> counts`` scores a batch of new traces, writes the scores to the score cache
and the traces it rejects, each with its reason and kind, to the run's ``_late/``; it hands on
only how many it scored and rejected. It can be unit-tested on a table without a cluster.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import time
from typing import Any

import numpy as np
import pyarrow as pa

from ln_ray.config import ComputeConfig, ScoringConfig, StudentConfig
from ln_ray.io.cache import ScoreCache
from ln_ray.io.folder import Folder
from ln_ray.io.manifest import LATE_DIR
from ln_ray.prepare.render import TokenizedTrace
from ln_ray.schema import (
    CACHE_SCHEMA,
    METRIC_COLUMNS,
    PREPARED_SCHEMA,
    SCORING_REJECTS_SCHEMA,
    require_columns,
)

log = logging.getLogger(__name__)

# What a scoring actor hands on per batch: traces scored, and traces rejected.
SCORE_COUNTS = pa.schema([("traces", pa.int64()), ("rejected", pa.int64())])


class ScoreStage:
    """Actor-side scoring: one student per actor, ``__call__`` scores a batch of new traces.

    Before its first batch the actor checks that it loaded the student the driver checked (the
    same identity) and proves it (``score/proof.py``): a mismatch, a refusal or a failed proof
    stops the job before anything is scored, and the reason reaches the driver through
    ``progress.halt``.

    Each batch's scores go to the score cache at once (so an interrupted run loses nothing), and
    the traces it could not score to the run's ``_late/``: nothing that grows with the batch
    leaves the actor. Which traces are new was decided before tokenizing (the cache lookup); the
    actor reads nothing from the cache.

    Args:
        student: The student to load.
        scoring: What to compute.
        compute: Batch sizes, token budget, threads, retries and whether a GPU is used.
        cache: The score cache for this student and scoring settings.
        run: The run's folder, whose ``_late/`` takes the traces rejected.
        identity: The student's identity as the driver computed it (None: not checked).
        progress: Told ``packs(tokens)`` as packs end and ``add(traces, tokens)`` after each
            batch, in model tokens (the job's progress report), the actor's kernel and proof,
            and ``halt(reason)`` when the job must stop.
    """

    def __init__(
        self,
        student: StudentConfig,
        scoring: ScoringConfig,
        compute: ComputeConfig,
        cache: ScoreCache,
        run: Folder,
        identity: str | None = None,
        progress: Any = None,
    ) -> None:
        started = time.perf_counter()
        import torch

        from ln_ray.prepare.render import unconditional_context
        from ln_ray.score.attention import attention_kernel
        from ln_ray.score.proof import prove_student
        from ln_ray.score.scorer import StudentScorer
        from ln_ray.score.student import load_student, pick_device
        from ln_ray.score.vetting import StudentError

        device = pick_device(compute.gpus_per_actor > 0)
        if compute.gpus_per_actor > 0 and device.type != "cuda":
            # Scoring on the CPU instead would also file fp32 scores under the bf16 cache key.
            raise RuntimeError(
                "compute.gpus_per_actor is set but this actor sees no CUDA device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            )
        if device.type == "cpu":
            torch.set_num_threads(_cpu_threads(compute))
        self.progress = progress
        try:
            self.student = load_student(student, device)
            if identity is not None and self.student.identity != identity:
                raise StudentError(
                    f"the student loaded on this node is not the one the job checked: "
                    f"{self.student.identity} here, {identity} on the driver (its weights, "
                    "tokenizer or template differ between the nodes' copies): give every node "
                    "the same snapshot of the student"
                )
            self.scorer = StudentScorer(
                self.student.model,
                window=scoring.window,
                window_fraction=scoring.window_fraction,
                rank_clip=scoring.rank_clip,
                max_tokens=scoring.max_tokens,
                token_budget=compute.token_budget,
                prefix_budget=compute.prefix_budget,
                head_chunk=compute.head_chunk,
                unconditional=unconditional_context(self.student.tokenizer, student.template_kwargs)
                if scoring.ifd
                else None,
            )
            self.proof = prove_student(self.scorer, student.model)
        except StudentError as exc:
            self._halt(str(exc))
            raise
        self.cache = cache
        self.run = run
        self.max_retries = compute.max_retries
        self.kernel = attention_kernel(self.student.model)
        self.batch_tokens = 0  # model tokens of the batch in hand so far
        if progress is not None:
            progress.kernel(self.kernel)
            progress.proof(self.proof.to_dict())
            self.scorer.on_pack = self._pack_done
        log.info(
            "scoring actor ready in %.1fs: %s on %s (%d threads), attention: %s; self-check: "
            "largest log-prob difference %.2g (tolerance %g)",
            time.perf_counter() - started,
            self.student.identity,
            device,
            torch.get_num_threads(),
            self.kernel,
            self.proof.max_difference,
            self.proof.tolerance,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score the batch's traces into the cache, and write those it cannot score to ``_late/``.

        A batch that fails is tried ``compute.max_retries`` more times, then split in halves
        down to single traces; a trace that still fails leaves as a reject with the error. A
        trace out of device memory even alone is tried again with smaller packs before it
        leaves as a reject. A device error that leaves the process unusable (a CUDA error)
        ends the actor instead, which Ray restarts, retrying its batch (``compute.max_retries``
        times); a problem with the student itself stops the job.

        The rejects (``SCORING_REJECTS_SCHEMA``: those the template could not render, and those
        that could not be scored) go to one file named by the batch's traces, so a batch retried
        after its actor died replaces its own file. The assemble stage finds the scores in the
        cache and gives each reject to every row of its trace.

        Returns:
            One row: ``traces`` scored and ``rejected`` (``SCORE_COUNTS``).
        """
        require_columns(batch.column_names, PREPARED_SCHEMA.names, "score")
        self.batch_tokens = 0
        rows = batch.to_pylist()
        for row in rows:
            if row["reject_reason"] is None:
                # A prompt filling the global cap leaves nothing to score globally.
                reason = self.scorer.reject_reason(row["prefix_len"])
                if reason is not None:
                    row.update(reject_reason=reason, reject_kind="too_long")
        todo: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row["reject_reason"] is None:
                todo.setdefault(row["trace_id"], row)  # a duplicate row is scored once
        scored, failed = self._score(list(todo.values()), self.max_retries)
        if scored:
            records = pa.Table.from_pylist(list(scored.values()), schema=CACHE_SCHEMA)
            self.cache.write_part(records)
        if self.progress is not None:
            tokens = sum(record["model_tokens"] for record in scored.values())
            self.progress.add(len(rows), tokens)
        rejected = []
        for row in rows:
            if row["reject_reason"] is not None:
                reason, kind = row["reject_reason"], row["reject_kind"]
            elif row["trace_id"] in failed:
                reason, kind = failed[row["trace_id"]]
            else:
                continue
            rejected.append(
                {
                    "prompt_id": row["prompt_id"],
                    "trace_id": row["trace_id"],
                    "reason": reason,
                    "kind": kind,
                }
            )
        if rejected:
            names = "\n".join(sorted(row["trace_id"] for row in rows)).encode()
            named = hashlib.sha1(names).hexdigest()[:20]
            self.run.write_table(
                posixpath.join(LATE_DIR, f"part-{named}.parquet"),
                pa.Table.from_pylist(rejected, schema=SCORING_REJECTS_SCHEMA),
            )
        return pa.table({"traces": [len(scored)], "rejected": [len(rejected)]}, schema=SCORE_COUNTS)

    def _pack_done(self, tokens: int) -> None:
        self.batch_tokens += tokens
        self.progress.packs(self.batch_tokens)

    def _score(
        self, rows: list[dict[str, Any]], retries: int
    ) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[str, str]]]:
        """Cache records by trace_id, and the (reason, kind) of traces that could not be
        scored."""
        if not rows:
            return {}, {}
        from ln_ray.score.failures import is_out_of_memory

        error: Exception | None = None
        for attempt in range(retries + 1):
            try:
                return self._score_once(rows), {}
            except Exception as exc:  # a scoring failure of any kind: sorted out below
                error = self._triage(exc)
                log.warning(
                    "scoring %d traces failed (attempt %d of %d): %s: %s",
                    len(rows),
                    attempt + 1,
                    retries + 1,
                    type(exc).__name__,
                    exc,
                )
                if is_out_of_memory(exc):
                    break  # the same packs would run out again: smaller ones, below
        assert error is not None
        if len(rows) == 1:
            if is_out_of_memory(error):
                return self._score_in_smaller_packs(rows[0])
            return {}, {rows[0]["trace_id"]: _scoring_failed(error)}
        half = len(rows) // 2
        first, first_failed = self._score(rows[:half], 0)
        second, second_failed = self._score(rows[half:], 0)
        return {**first, **second}, {**first_failed, **second_failed}

    def _score_in_smaller_packs(
        self, row: dict[str, Any]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[str, str]]]:
        """One trace that ran out of memory alone: again with packs of half the tokens, down
        to ``MIN_PACK_TOKENS``; then a reject."""
        from ln_ray.score.failures import is_out_of_memory

        budget = self.scorer.token_budget
        smaller = budget // 2
        while smaller >= MIN_PACK_TOKENS:
            try:
                with self.scorer.packs_of(smaller):
                    return self._score_once([row]), {}
            except Exception as exc:
                error = self._triage(exc)
                if not is_out_of_memory(error):
                    return {}, {row["trace_id"]: _scoring_failed(error)}
                log.warning("out of memory alone in packs of %d tokens", smaller)
            smaller //= 2
        reason = f"too long for this device at compute.token_budget={budget}"
        return {}, {row["trace_id"]: (reason, "out_of_memory")}

    def _triage(self, exc: Exception) -> Exception:
        """Let a scoring failure through to be retried or rejected, unless it means the job
        must stop (the student cannot be scored exactly) or the actor must restart (a device
        error that poisons the process)."""
        from ln_ray.score.failures import is_device_fatal
        from ln_ray.score.vetting import StudentError

        if isinstance(exc, StudentError):
            self._halt(str(exc))
            raise exc
        if is_device_fatal(exc):
            log.error("a device error poisons this actor; it restarts: %s", exc)
            _exit_actor(DEVICE_ERROR_EXIT)
        return exc

    def _halt(self, reason: str) -> None:
        if self.progress is not None:
            self.progress.halt(reason)

    def _score_once(self, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        traces = [
            TokenizedTrace(
                input_ids=np.asarray(row["input_ids"], dtype=np.int64),
                prefix_len=row["prefix_len"],
                step_bounds=np.asarray(row["step_bounds"], dtype=np.int64),
            )
            for row in rows
        ]
        started, tokens = time.perf_counter(), self.scorer.model_tokens
        results = self.scorer.score(traces)
        seconds = time.perf_counter() - started
        log.info(
            "scored %d traces in %.1fs (%.0f model tokens/s)",
            len(traces),
            seconds,
            (self.scorer.model_tokens - tokens) / max(seconds, 1e-9),
        )
        return {
            row["trace_id"]: {
                "trace_id": row["trace_id"],
                "n_tokens": result.n_tokens,
                "n_steps": result.n_steps,
                "truncated": result.truncated,
                "step_logprobs": result.step_logprobs,
                "model_tokens": result.model_tokens,
                "step_chars": row["step_chars"],
                **{name: _finite_or_none(getattr(result, name)) for name in METRIC_COLUMNS},
            }
            for row, result in zip(rows, results)
        }


MIN_PACK_TOKENS = 64  # the smallest packs a trace out of memory alone is tried with
DEVICE_ERROR_EXIT = 75  # the exit status of an actor a device error poisoned


def _scoring_failed(error: Exception) -> tuple[str, str]:
    """The reject reason (on one line) and kind of a trace whose scoring kept failing."""
    return " ".join(f"scoring failed: {type(error).__name__}: {error}".split()), "scoring_error"


def _exit_actor(status: int) -> None:
    # Ray restarts an actor whose process ends (compute.max_retries times) and retries its
    # batch; an exception would instead fail the batch, or the job.
    os._exit(status)


def _cpu_threads(compute: ComputeConfig) -> int:
    if compute.torch_threads:
        return compute.torch_threads
    # Ray pins OMP_NUM_THREADS to the actor's CPU reservation; a single CPU actor may use the node.
    if compute.actors == 1:
        return os.cpu_count() or 1
    return max(1, int(compute.cpus_per_actor))


def _finite_or_none(value: float) -> float | None:
    return None if value is None or np.isnan(value) else float(value)
