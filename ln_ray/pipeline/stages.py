"""The per-row stages of the job before scoring, as plain callables over Arrow batches (no Ray
import).

``validate_batch`` runs as a CPU task over every row: validate, present the reasoning, compute
the trace's id (which ``lookup.py`` looks up in the score cache). Only new traces go on:
``tokenize_batch`` (CPU tasks: segment, render, tokenize), then ``score_stage.ScoreStage`` in
the actor pool. Each can be
unit-tested on a table without a cluster. Rejected rows keep their reason and kind, so nothing is
dropped on the way to ``rejects/``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ln_ray.config import (
    ScoringConfig,
    SegmentConfig,
    StudentConfig,
    reasoning_format,
    render_options,
)
from ln_ray.io import jsontext
from ln_ray.prepare.render import TokenizedTrace, unconditional_context
from ln_ray.prepare.rows import (
    RowRejected,
    TraceRow,
    present_row,
    tokenize_row,
    trace_id,
    validate_row,
)
from ln_ray.schema import (
    PREPARED_SCHEMA,
    RAW_SCHEMA,
    VALIDATED_SCHEMA,
    require_columns,
)
from ln_ray.score.planning import plan_scorable

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
) -> pa.Table:
    """Validate a batch of raw rows.

    No tokenizer and no segmenter runs here: a trace's id is known from its content and the
    segmenter settings, so rows whose trace is cached go no further than the join with the cache
    (``lookup.py`` finds them).

    Args:
        batch: Rows in ``RAW_SCHEMA``.
        segment: Segmenter settings (part of a trace's id when the row has no ``steps``).
        scoring: The reasoning presentation and the cap on a response's length.
        student: The student's reasoning markers.

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
            "item": raw["item"],
            "prompt_id": raw["prompt_id"],
            "teacher": raw["teacher"],
        }
        try:
            if raw["read_error"]:
                raise RowRejected(raw["read_error"])
            trace = present_row(validate_row(raw, scoring.max_response_chars), fmt)
        except RowRejected as exc:
            row.update(reject_reason=str(exc), reject_kind=exc.kind)
            out.append(row)
            continue
        row.update(
            trace_id=trace_id(trace, segment.mode, segment.min_chars),
            prompt_id=trace.prompt_id,
            correct=trace.correct,
            messages=jsontext.dumps(trace.messages, native=True),
            dup_key=duplicate_key(trace),
            context_key=context_key(trace),
            step_chars=None if trace.steps is None else [len(step) for step in trace.steps],
        )
        out.append(row)
    index = VALIDATED_SCHEMA.get_field_index("extra")
    table = pa.Table.from_pylist(out, schema=VALIDATED_SCHEMA.remove(index))
    accepted = pc.is_null(table["reject_reason"])
    extra = pc.if_else(accepted, batch["extra"], pa.scalar(None, pa.string()))
    return table.add_column(index, VALIDATED_SCHEMA.field(index), extra)


# What tokenizing reads of a validated row: all of it but the other input columns (``extra``).
TOKENIZE_INPUT = pa.schema([field for field in VALIDATED_SCHEMA if field.name != "extra"])


def tokenize_batch(
    batch: pa.Table,
    *,
    student: StudentConfig,
    segment: SegmentConfig,
    scoring: ScoringConfig,
    limits: PlanLimits | None = None,
    progress: Any = None,
) -> pa.Table:
    """Segment, render and tokenize validated rows (new traces); a row the student's template
    cannot render becomes a reject.

    Args:
        batch: Rows in ``TOKENIZE_INPUT`` (or ``VALIDATED_SCHEMA``), accepted and not cached.
        student: Whose tokenizer, chat template and template arguments to use (the tokenizer is
            loaded once per worker process).
        segment: Segmenter settings for rows without ``steps``.
        scoring: The student's view, and its windows.
        limits: The student's global cap and RoPE limit: with ``progress``, the model tokens
            the batch's traces will cost are planned (``planning.plan_scorable``) and reported
            (``progress.plan(traces, tokens)``), the progress report's total.
        progress: The job's progress report.

    Returns:
        Rows in ``PREPARED_SCHEMA``, one per input row, in order.
    """
    require_columns(batch.column_names, TOKENIZE_INPUT.names, "tokenize")
    tokenizer = _tokenizer(student)
    render = render_options(student, scoring)
    out, planned = [], []
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
            out.append({**row, "reject_reason": str(exc), "reject_kind": exc.kind})
            continue
        planned.append(tokens)
        out.append(
            {
                **row,
                "step_chars": [len(step) for step in steps],
                "input_ids": tokens.input_ids.astype(np.int32),
                "prefix_len": tokens.prefix_len,
                "step_bounds": tokens.step_bounds.astype(np.int32),
            }
        )
    if progress is not None and limits is not None:
        unconditional = None
        if scoring.ifd:
            unconditional = unconditional_context(tokenizer, student.template_kwargs)
        progress.plan(len(planned), planned_tokens(planned, scoring, limits, unconditional))
    return pa.Table.from_pylist(
        [{name: row.get(name) for name in PREPARED_SCHEMA.names} for row in out],
        schema=PREPARED_SCHEMA,
    )


@dataclass(frozen=True)
class PlanLimits:
    """What planning a trace's sequences needs of the student (``VettedStudent``)."""

    global_cap: int
    rope_limit: int | None


def planned_tokens(
    traces: list[TokenizedTrace],
    scoring: ScoringConfig,
    limits: PlanLimits,
    unconditional: np.ndarray | None = None,
) -> int:
    """The model tokens scoring ``traces`` costs (prompts too long to score cost none), with
    their responses given no prompt after ``unconditional`` (``scoring.ifd``)."""
    plan = plan_scorable(
        traces,
        scoring,
        max_tokens=limits.global_cap,
        rope_limit=limits.rope_limit,
        unconditional=unconditional,
    )
    return sum(plan.model_tokens)


def duplicate_key(row: TraceRow) -> str:
    """Rows with equal (prompt_id, teacher, response) are duplicates of each other."""
    payload = jsontext.dumps([row.prompt_id, row.teacher, row.response], native=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def context_key(row: TraceRow) -> str:
    """The conversation before the response: rows of one prompt_id must all have the same."""
    payload = jsontext.dumps(row.messages[:-1], native=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]
