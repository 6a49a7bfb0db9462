"""The per-row stages of the job, as plain callables over Arrow batches (no Ray import).

``validate_batch`` runs as a CPU task over every row: validate, present the reasoning, compute
the trace's id and look it up in the score cache. Only new traces go on: ``tokenize_batch`` (CPU
tasks: segment, render, tokenize) and ``ScoreStage``, which runs in an actor pool: built once per
actor (loads the student), then ``__call__(batch) -> rejects``, writing the scores to the score
cache and handing on only the rows it rejects. Each can be unit-tested on a table without a
cluster. Rejected rows keep their reason, so nothing is dropped on the way to ``rejects/``.
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
import pyarrow.compute as pc

from ln_ray.config import ComputeConfig, ScoringConfig, SegmentConfig, StudentConfig
from ln_ray.io import cache, jsontext
from ln_ray.prepare.reasoning import ReasoningFormat
from ln_ray.prepare.render import RenderOptions, TokenizedTrace
from ln_ray.prepare.rows import (
    RowRejected,
    TraceRow,
    present_row,
    tokenize_row,
    trace_id,
    validate_row,
)
from ln_ray.schema import (
    CACHE_SCHEMA,
    LATE_REJECTS_SCHEMA,
    METRIC_COLUMNS,
    PREPARED_SCHEMA,
    RAW_SCHEMA,
    VALIDATED_SCHEMA,
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


def validate_batch(
    batch: pa.Table,
    *,
    segment: SegmentConfig,
    scoring: ScoringConfig,
    student: StudentConfig,
    cached: np.ndarray,
) -> pa.Table:
    """Validate a batch of raw rows and look their traces up in the score cache.

    No tokenizer and no segmenter runs here: a trace's id is known from its content and the
    segmenter settings, so rows whose trace is cached go no further than the join with the cache.

    Args:
        batch: Rows in ``RAW_SCHEMA``.
        segment: Segmenter settings (part of a trace's id when the row has no ``steps``).
        scoring: The reasoning presentation and the cap on a response's length.
        student: The student's reasoning markers.
        cached: Sorted trace ids in the score cache (``cache.cached_trace_ids``).

    Returns:
        Rows in ``VALIDATED_SCHEMA``, one per input row, in order; rejected rows keep their reason.
    """
    require_columns(batch.column_names, RAW_SCHEMA.names, "validate")
    fmt = reasoning_format(student, scoring)
    out = []
    # The other input columns (``extra``, often the widest) pass through as Arrow, never as
    # Python strings.
    for raw in batch.drop_columns(["extra"]).to_pylist():
        row: dict[str, Any] = {
            "source_file": raw["source_file"],
            "row_number": raw["row_number"],
            "prompt_id": raw["prompt_id"],
            "teacher": raw["teacher"],
        }
        try:
            if raw["read_error"]:
                raise RowRejected(raw["read_error"])
            trace = present_row(validate_row(raw, scoring.max_response_chars), fmt)
        except RowRejected as exc:
            row["reject_reason"] = str(exc)
            out.append(row)
            continue
        row.update(
            trace_id=trace_id(trace, segment.mode, segment.min_chars),
            prompt_id=trace.prompt_id,
            correct=trace.correct,
            messages=jsontext.dumps(trace.messages, native=True),
            dup_key=duplicate_key(trace),
            step_chars=None if trace.steps is None else [len(step) for step in trace.steps],
        )
        out.append(row)
    index = VALIDATED_SCHEMA.get_field_index("extra")
    table = pa.Table.from_pylist(out, schema=VALIDATED_SCHEMA.remove(index))
    accepted = pc.is_null(table["reject_reason"])
    extra = pc.if_else(accepted, batch["extra"], pa.scalar(None, pa.string()))
    table = table.add_column(index, VALIDATED_SCHEMA.field(index), extra)
    hits = cache.contains(cached, pc.fill_null(table["trace_id"], "").to_pylist())
    return table.set_column(
        table.schema.get_field_index("cached"), "cached", pa.array(hits, pa.bool_())
    )


def is_new(table: pa.Table) -> pa.Array:
    """Validated rows that go on to tokenizing and scoring: accepted, and not in the cache."""
    return pc.and_(pc.is_null(table["reject_reason"]), pc.invert(table["cached"]))


# What tokenizing reads of a validated row: all of it but the other input columns (``extra``).
TOKENIZE_INPUT = pa.schema([field for field in VALIDATED_SCHEMA if field.name != "extra"])


def tokenize_batch(
    batch: pa.Table,
    *,
    student: StudentConfig,
    segment: SegmentConfig,
    scoring: ScoringConfig,
) -> pa.Table:
    """Segment, render and tokenize validated rows (new traces); a row the student's template
    cannot render becomes a reject.

    Args:
        batch: Rows in ``TOKENIZE_INPUT`` (or ``VALIDATED_SCHEMA``), accepted and not cached.
        student: Whose tokenizer, chat template and template arguments to use (the tokenizer is
            loaded once per worker process).
        segment: Segmenter settings for rows without ``steps``.
        scoring: The student's view.

    Returns:
        Rows in ``PREPARED_SCHEMA``, one per input row, in order.
    """
    require_columns(batch.column_names, TOKENIZE_INPUT.names, "tokenize")
    tokenizer = _tokenizer(student)
    render = render_options(student, scoring)
    out = []
    for row in batch.to_pylist():
        messages = jsontext.loads(row["messages"])
        response = messages[-1]["content"]
        cuts = np.cumsum([0, *row["step_chars"]]) if row["step_chars"] is not None else None
        trace = TraceRow(
            prompt_id=row["prompt_id"],
            teacher=row["teacher"],
            messages=messages,
            steps=None if cuts is None else [response[a:b] for a, b in zip(cuts, cuts[1:])],
            correct=row["correct"],
        )
        try:
            steps, tokens = tokenize_row(
                trace,
                tokenizer,
                segment_mode=segment.mode,
                min_step_chars=segment.min_chars,
                render=render,
            )
        except RowRejected as exc:
            out.append({**row, "reject_reason": str(exc)})
            continue
        out.append(
            {
                **row,
                "step_chars": [len(step) for step in steps],
                "input_ids": tokens.input_ids.astype(np.int32),
                "prefix_len": tokens.prefix_len,
                "step_bounds": tokens.step_bounds.astype(np.int32),
            }
        )
    return pa.Table.from_pylist(
        [{name: row.get(name) for name in PREPARED_SCHEMA.names} for row in out],
        schema=PREPARED_SCHEMA,
    )


class ScoreStage:
    """Actor-side scoring: one student per actor, ``__call__`` scores a batch of new traces.

    Each batch's scores go to the score cache at once (so an interrupted run loses nothing);
    only the rows that could not be scored leave the actor. Which traces are new was decided
    before tokenizing (``validate_batch``); the actor reads nothing from the cache.

    Args:
        student: The student to load.
        scoring: What to compute.
        compute: Batch sizes, token budget, threads, retries and whether a GPU is used.
        cache_url: The score cache folder for this student and scoring settings.
        progress: Told ``add(traces, tokens)`` after each batch (the job's progress report).
    """

    def __init__(
        self,
        student: StudentConfig,
        scoring: ScoringConfig,
        compute: ComputeConfig,
        cache_url: str,
        progress: Any = None,
    ) -> None:
        started = time.perf_counter()
        import torch

        from ln_ray.score.attention import attention_kernel
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
        self.max_retries = compute.max_retries
        self.progress = progress
        self.kernel = attention_kernel(self.student.model)
        if progress is not None:
            progress.kernel(self.kernel)
        log.info(
            "scoring actor ready in %.1fs: %s on %s (%d threads), attention: %s",
            time.perf_counter() - started,
            self.student.identity,
            device,
            torch.get_num_threads(),
            self.kernel,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score the batch's traces into the cache; hand on every row with its scores.

        A batch that fails is tried ``compute.max_retries`` more times, then split in halves
        down to single traces; a trace that still fails leaves as a reject with the error.

        Returns:
            The batch's rejected rows (``LATE_REJECTS_SCHEMA``): those the template could not
            render, and those that could not be scored. The scored rows' scores are in the
            cache, where the assemble stage finds them.
        """
        require_columns(batch.column_names, PREPARED_SCHEMA.names, "score")
        rows = batch.to_pylist()
        for row in rows:
            if row["reject_reason"] is None:
                # A prompt filling the global cap leaves nothing to score globally.
                row["reject_reason"] = self.scorer.reject_reason(row["prefix_len"])
        todo: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row["reject_reason"] is None:
                todo.setdefault(row["trace_id"], row)  # a duplicate row is scored once
        scored, failed = self._score(list(todo.values()), self.max_retries)
        if scored:
            records = pa.Table.from_pylist(list(scored.values()), schema=CACHE_SCHEMA)
            cache.write_part(self.cache_url, records)
        if self.progress is not None:
            tokens = sum(record["n_tokens"] for record in scored.values())
            self.progress.add(len(rows), tokens)
        rejected = [
            {
                "source_file": row["source_file"],
                "row_number": row["row_number"],
                "reason": row["reject_reason"] or failed[row["trace_id"]],
            }
            for row in rows
            if row["reject_reason"] or row["trace_id"] in failed
        ]
        return pa.Table.from_pylist(rejected, schema=LATE_REJECTS_SCHEMA)

    def _score(
        self, rows: list[dict[str, Any]], retries: int
    ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Cache records by trace_id, and the errors of traces that could not be scored."""
        if not rows:
            return {}, {}
        for attempt in range(retries + 1):
            try:
                return self._score_once(rows), {}
            except Exception as exc:  # a scoring failure of any kind: retry, then split
                error = exc
                log.warning(
                    "scoring %d traces failed (attempt %d of %d): %s: %s",
                    len(rows),
                    attempt + 1,
                    retries + 1,
                    type(exc).__name__,
                    exc,
                )
        if len(rows) == 1:
            reason = f"scoring failed: {type(error).__name__}: {error}"
            return {}, {rows[0]["trace_id"]: " ".join(reason.split())}
        half = len(rows) // 2
        first, first_failed = self._score(rows[:half], 0)
        second, second_failed = self._score(rows[half:], 0)
        return {**first, **second}, {**first_failed, **second_failed}

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
    payload = jsontext.dumps([row.prompt_id, row.teacher, row.response], native=True)
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
