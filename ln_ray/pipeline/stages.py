"""The two per-row stages of the job, as plain callables over Arrow batches (no Ray import).

``prepare_batch`` runs as a CPU task: validate, segment, render, tokenize. ``ScoreStage`` runs in
an actor pool: built once per actor (loads the student), then ``__call__(batch) -> batch``, writing
new scores to the score cache and handing them on with the rows. Both can be unit-tested on a
table without a cluster. Rejected rows pass through both stages with their reason, so nothing is
dropped on the way to ``rejects/``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from ln_ray.config import ComputeConfig, ScoringConfig, SegmentConfig, StudentConfig
from ln_ray.io import cache
from ln_ray.prepare.reasoning import ReasoningFormat
from ln_ray.prepare.render import RenderOptions, TokenizedTrace
from ln_ray.prepare.rows import RowRejected, TraceRow, prepare_row
from ln_ray.schema import (
    CACHE_SCHEMA,
    METRIC_COLUMNS,
    PREPARED_SCHEMA,
    RAW_SCHEMA,
    ROW_META_SCHEMA,
    SCORED_ROWS_SCHEMA,
    require_columns,
)

log = logging.getLogger(__name__)


def _tokenizer(student: StudentConfig) -> Any:
    # Config dataclasses are unhashable; key the per-process cache on their JSON form.
    return _cached_tokenizer(json.dumps(dataclasses.asdict(student), sort_keys=True))


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(student_json: str) -> Any:
    from ln_ray.score.student import load_tokenizer

    return load_tokenizer(StudentConfig(**json.loads(student_json)))


def prepare_batch(
    batch: pa.Table,
    *,
    student: StudentConfig,
    segment: SegmentConfig,
    scoring: ScoringConfig,
) -> pa.Table:
    """Validate and tokenize a batch of raw rows; rejected rows keep their reason.

    Args:
        batch: Rows in ``RAW_SCHEMA``.
        student: Whose tokenizer, chat template, template arguments and reasoning markers to use
            (the tokenizer is loaded once per worker process).
        segment: Segmenter settings for rows without ``steps``.
        scoring: The view, the reasoning presentation and the cap on a response's length.

    Returns:
        Rows in ``PREPARED_SCHEMA``, one per input row, in order.
    """
    require_columns(batch.column_names, RAW_SCHEMA.names, "prepare")
    tokenizer = _tokenizer(student)
    render, reasoning = render_options(student, scoring), reasoning_format(student, scoring)
    out = []
    for raw in batch.to_pylist():
        row: dict[str, Any] = {
            "source_file": raw["source_file"],
            "row_number": raw["row_number"],
            "prompt_id": raw["prompt_id"],
            "teacher": raw["teacher"],
        }
        try:
            if raw["read_error"]:
                raise RowRejected(raw["read_error"])
            prepared = prepare_row(
                raw,
                tokenizer,
                segment_mode=segment.mode,
                min_step_chars=segment.min_chars,
                max_response_chars=scoring.max_response_chars,
                render=render,
                reasoning=reasoning,
            )
        except RowRejected as exc:
            row["reject_reason"] = str(exc)
            out.append(row)
            continue
        tokens = prepared.tokens
        row.update(
            trace_id=prepared.trace_id,
            prompt_id=prepared.row.prompt_id,
            correct=prepared.row.correct,
            messages=json.dumps(prepared.row.messages, ensure_ascii=False),
            dup_key=duplicate_key(prepared.row),
            step_chars=[len(step) for step in prepared.steps],
            extra=raw["extra"],
            input_ids=tokens.input_ids.astype(np.int32),
            prefix_len=tokens.prefix_len,
            step_bounds=tokens.step_bounds.astype(np.int32),
        )
        out.append(row)
    return pa.Table.from_pylist(out, schema=PREPARED_SCHEMA)


class ScoreStage:
    """Actor-side scoring: one student per actor, ``__call__`` scores a batch of prepared rows.

    Each batch's new scores go to the score cache at once (so an interrupted run loses nothing)
    and out with their rows; rows whose trace is already cached are not scored again and leave
    with null scores, which the job joins back from the cache afterwards.

    Args:
        student: The student to load.
        scoring: What to compute.
        compute: Batch sizes, token budget, threads and whether a GPU is used.
        cache_url: The score cache folder for this student and scoring settings; the traces
            in it when the actor starts are not scored again (an actor restarted mid-run also
            skips what the run has scored so far).
    """

    def __init__(
        self,
        student: StudentConfig,
        scoring: ScoringConfig,
        compute: ComputeConfig,
        cache_url: str,
    ) -> None:
        started = time.perf_counter()
        import torch

        from ln_ray.score.scorer import StudentScorer
        from ln_ray.score.student import load_student, pick_device

        device = pick_device(compute.gpus_per_actor > 0)
        if compute.gpus_per_actor > 0 and device.type != "cuda":
            # Scoring on the CPU instead would also file fp32 scores under the bf16 cache key.
            raise RuntimeError(
                "compute.gpus_per_actor is set but this actor sees no CUDA device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            )
        if device.type == "cpu":
            torch.set_num_threads(_cpu_threads(compute))
        self.student = load_student(student, device)
        self.scorer = StudentScorer(
            self.student.model,
            window=scoring.window,
            window_fraction=scoring.window_fraction,
            rank_clip=scoring.rank_clip,
            max_tokens=scoring.max_tokens,
            token_budget=compute.token_budget,
            head_chunk=compute.head_chunk,
        )
        self.cache_url = cache_url
        self.cached = cache.cached_trace_ids(cache_url)
        log.info(
            "scoring actor ready in %.1fs: %s on %s (%d threads)",
            time.perf_counter() - started,
            self.student.identity,
            device,
            torch.get_num_threads(),
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score the batch's new traces into the cache; hand on every row, new scores included.

        Returns:
            Rows in ``SCORED_ROWS_SCHEMA``, one per input row, in order; the score columns are
            null for rejected rows and for rows whose trace was already in the cache.
        """
        require_columns(batch.column_names, PREPARED_SCHEMA.names, "score")
        rows = batch.to_pylist()
        for row in rows:
            if row["reject_reason"] is None:
                # A prompt filling the global cap leaves nothing to score globally.
                row["reject_reason"] = self.scorer.reject_reason(row["prefix_len"])
        candidates = [r for r in rows if r["reject_reason"] is None]
        known = cache.contains(self.cached, [r["trace_id"] for r in candidates])
        todo: dict[str, dict[str, Any]] = {}
        for row, done in zip(candidates, known):
            if not done:
                todo.setdefault(row["trace_id"], row)  # a duplicate row is scored once
        scored = self._score_into_cache(list(todo.values())) if todo else {}
        empty: dict[str, Any] = {}
        return pa.Table.from_pylist(
            [
                {
                    **{name: row.get(name) for name in ROW_META_SCHEMA.names},
                    **scored.get(row.get("trace_id"), empty),
                }
                for row in rows
            ],
            schema=SCORED_ROWS_SCHEMA,
        )

    def _score_into_cache(self, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Score rows, write their cache part; the cache records by trace_id."""
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
        records = []
        for row, result in zip(rows, results):
            records.append(
                {
                    "trace_id": row["trace_id"],
                    "n_tokens": result.n_tokens,
                    "n_steps": result.n_steps,
                    "truncated": result.truncated,
                    "step_logprobs": result.step_logprobs,
                    "model_tokens": result.model_tokens,
                    **{name: _finite_or_none(getattr(result, name)) for name in METRIC_COLUMNS},
                }
            )
        cache.write_part(self.cache_url, pa.Table.from_pylist(records, schema=CACHE_SCHEMA))
        return {record.pop("trace_id"): record for record in records}


def render_options(student: StudentConfig, scoring: ScoringConfig) -> RenderOptions:
    """The student's view of a trace, from the config."""
    return RenderOptions(view=scoring.render, template_kwargs=dict(student.template_kwargs))


def reasoning_format(student: StudentConfig, scoring: ScoringConfig) -> ReasoningFormat:
    """How reasoning is presented to the student, from the config."""
    return ReasoningFormat(
        mode=scoring.reasoning, open=student.reasoning_open, close=student.reasoning_close
    )


def duplicate_key(row: TraceRow) -> str:
    """Rows with equal (prompt_id, teacher, response) are duplicates of each other."""
    payload = json.dumps([row.prompt_id, row.teacher, row.response], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def _cpu_threads(compute: ComputeConfig) -> int:
    if compute.torch_threads:
        return compute.torch_threads
    # Ray pins OMP_NUM_THREADS to the actor's CPU reservation; a single CPU actor may use the node.
    if compute.actors == 1:
        return os.cpu_count() or 1
    return max(1, int(compute.cpus_per_actor))


def _finite_or_none(value: float) -> float | None:
    return None if value is None or np.isnan(value) else float(value)
