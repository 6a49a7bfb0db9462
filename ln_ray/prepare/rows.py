"""Validate one input row and turn it into a scoring-ready trace, or a reject with a reason.

Rows arrive in the canonical layout of ``ln_ray.schema.RAW_COLUMNS`` (the reader has already mapped
the user's column names). Every failure raises :class:`RowRejected` with a short reason that ends up
in ``rejects/``; nothing here ever evaluates or unpickles input data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ln_ray.prepare.layout import sharegpt_message
from ln_ray.prepare.reasoning import ReasoningFormat, map_steps, present
from ln_ray.prepare.render import RenderError, RenderOptions, TokenizedTrace, tokenize_trace
from ln_ray.prepare.segment import check_steps, segment_steps


class RowRejected(ValueError):
    """The row cannot be scored; ``str(exc)`` is the reason written to ``rejects/``, ``kind``
    its kind (``schema.REJECT_KINDS``)."""

    def __init__(self, reason: str, kind: str = "input") -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class TraceRow:
    """A validated input row.

    ``reasoning`` is a reasoning given apart from the response (a ``reasoning`` column or the
    last message's ``reasoning_content``); ``steps`` then partition the reasoning followed by
    the response.
    """

    prompt_id: str
    teacher: str
    messages: list[dict[str, str]]
    steps: list[str] | None
    correct: bool | None
    reasoning: str | None = None

    @property
    def prompt(self) -> str:
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class PreparedTrace:
    """A validated row with its steps and tokens, ready for the student."""

    row: TraceRow
    trace_id: str
    steps: list[str]
    tokens: TokenizedTrace


def validate_row(raw: dict[str, Any], max_response_chars: int) -> TraceRow:
    """Check one canonical row and build its conversation.

    Args:
        raw: A row with the canonical keys (prompt_id, prompt, teacher, response, reasoning,
            steps, correct, messages, system); absent optional fields are None. A row with
            ``steps`` and no response has their concatenation as its response. ``messages`` may
            be OpenAI-style (``role``, ``content``) or ShareGPT-style (``from``, ``value``); a
            ``system`` text opens the conversation as its system message.
        max_response_chars: Hard cap on the response length (reasoning included).

    Returns:
        The validated row.

    Raises:
        RowRejected: With the reason.
    """
    teacher = _text(raw, "teacher")
    steps = raw.get("steps")
    if raw.get("response") is None and raw.get("messages") is None and _strings(steps):
        raw = {**raw, "response": "".join(steps)}
    messages, reasoning = _messages(raw)
    response = messages[-1]["content"]
    if not response.strip() and not (reasoning or "").strip():
        raise RowRejected("empty response")
    if len(response) + len(reasoning or "") > max_response_chars:
        raise RowRejected(f"response longer than {max_response_chars} characters", "too_long")
    prompt_id = raw.get("prompt_id")
    if prompt_id is None:
        prompt_id = "p-" + _digest(json.dumps(messages[:-1], sort_keys=True))[:16]
    elif not isinstance(prompt_id, str | int):
        raise RowRejected("prompt_id is not a string or integer")
    if steps is not None:
        steps = list(steps)
        problem = check_steps(steps, (reasoning or "") + response)
        if problem:
            raise RowRejected(f"bad steps: {problem}")
    correct = raw.get("correct")
    if correct is not None and not isinstance(correct, bool):
        raise RowRejected("correct is not a boolean")
    return TraceRow(str(prompt_id), teacher, messages, steps, correct, reasoning)


def prepare_row(
    raw: dict[str, Any],
    tokenizer: Any,
    *,
    segment_mode: str = "sentence",
    min_step_chars: int = 8,
    max_response_chars: int = 400_000,
    render: RenderOptions | None = None,
    reasoning: ReasoningFormat | None = None,
) -> PreparedTrace:
    """Validate, present the reasoning, identify, segment, render and tokenize one row.

    The job runs the same steps in two stages, so that a trace already in the score cache is
    never segmented or tokenized: :func:`validate_row`, :func:`present_row` and
    :func:`trace_id` for every row, then :func:`tokenize_row` for the new ones.

    Args:
        raw: A canonical input row.
        tokenizer: The student's fast tokenizer with a chat template.
        segment_mode: Segmenter used when the row has no ``steps``.
        min_step_chars: Shorter fragments merge into the following step.
        max_response_chars: Hard cap on the response length.
        render: The student's view and the template's arguments (default: the generation view).
        reasoning: How reasoning is presented to the student (default: as given).

    Returns:
        The prepared trace; its row holds the response as scored (reasoning presented).

    Raises:
        RowRejected: With the reason.
    """
    row = present_row(validate_row(raw, max_response_chars), reasoning or ReasoningFormat())
    steps, tokens = tokenize_row(
        row, tokenizer, segment_mode=segment_mode, min_step_chars=min_step_chars, render=render
    )
    identity = trace_id(row, segment_mode, min_step_chars)
    return PreparedTrace(row=row, trace_id=identity, steps=steps, tokens=tokens)


def tokenize_row(
    row: TraceRow,
    tokenizer: Any,
    *,
    segment_mode: str = "sentence",
    min_step_chars: int = 8,
    render: RenderOptions | None = None,
) -> tuple[list[str], TokenizedTrace]:
    """Cut a presented row into steps (its own, or the segmenter's) and tokenize it.

    Raises:
        RowRejected: The student's template cannot render it (the reason says why).
    """
    steps = row.steps or segment_steps(row.response, segment_mode, min_step_chars)
    try:
        tokens = tokenize_trace(tokenizer, row.messages, steps, render or RenderOptions())
    except RenderError as exc:
        raise RowRejected(str(exc), "render") from None
    return steps, tokens


def present_row(row: TraceRow, fmt: ReasoningFormat) -> TraceRow:
    """The row with its response as the student will read it (``reasoning.present``), its
    steps carried onto that text, and no separate reasoning."""
    presented = present(row.response, row.reasoning, fmt)
    if presented.text == row.response and row.reasoning is None:
        return row
    messages = [*row.messages[:-1], {**row.messages[-1], "content": presented.text}]
    steps = map_steps(row.steps, presented) if row.steps is not None else None
    return TraceRow(row.prompt_id, row.teacher, messages, steps, row.correct)


def trace_id(row: TraceRow, segment_mode: str = "sentence", min_step_chars: int = 8) -> str:
    """Stable content hash of everything that determines a trace's steps and scores, but the
    student and the scoring settings (the score cache's key holds those).

    It hashes prompt_id, teacher, the conversation as scored and the steps: the row's own, or
    the segmenter settings that will cut them, so it is known before anything is segmented.
    """
    steps: Any = row.steps
    if steps is None:
        steps = {"segmenter": [segment_mode, min_step_chars]}
    payload = json.dumps(
        {
            "prompt_id": row.prompt_id,
            "teacher": row.teacher,
            "messages": row.messages,
            "steps": steps,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return _digest(payload)[:32]


def _strings(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _text(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    if value is None:
        raise RowRejected(f"missing {key}")
    if not isinstance(value, str):
        raise RowRejected(f"{key} is not a string")
    return value


def _messages(raw: dict[str, Any]) -> tuple[list[dict[str, str]], str | None]:
    """The row's ``messages`` (or ``[user: prompt, assistant: response]``) opened by its
    ``system`` text if it has one; and the reasoning given apart from the response, if any."""
    messages, reasoning = _conversation(raw)
    system = raw.get("system")
    if system is None or not system.strip():
        return messages, reasoning
    if messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages], reasoning
    if messages[0]["content"] != system:
        raise RowRejected("system differs from the conversation's own system message")
    return messages, reasoning


def _conversation(raw: dict[str, Any]) -> tuple[list[dict[str, str]], str | None]:
    given = raw.get("messages")
    reasoning = raw.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, str):
        raise RowRejected("reasoning is not a string")
    if given is None:
        messages = [
            {"role": "user", "content": _text(raw, "prompt")},
            {"role": "assistant", "content": _text(raw, "response")},
        ]
        return messages, reasoning
    if isinstance(given, str):
        try:
            given = json.loads(given)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            raise RowRejected("messages is not valid JSON") from None
    if not isinstance(given, list) or not given:
        raise RowRejected("messages is not a non-empty list")
    messages = []
    for message in given:
        if not isinstance(message, dict):
            raise RowRejected("a message is not an object")
        try:
            role, content = sharegpt_message(message) or (
                message.get("role"),
                message.get("content"),
            )
        except ValueError as exc:
            raise RowRejected(str(exc)) from None
        if not isinstance(role, str) or not isinstance(content, str):
            raise RowRejected("a message lacks a string role or content")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise RowRejected("the last message is not the assistant's response")
    response = raw.get("response")
    if response is not None and response != messages[-1]["content"]:
        raise RowRejected("response differs from the last message")
    last = given[-1]
    own = next((last[k] for k in _REASONING_KEYS if last.get(k) is not None), None)
    if own is not None:
        if not isinstance(own, str):
            raise RowRejected("the last message's reasoning_content is not a string")
        if reasoning is not None and reasoning != own:
            raise RowRejected("reasoning differs from the last message's reasoning_content")
        reasoning = own
    return messages, reasoning


# Where chat APIs put an assistant message's reasoning.
_REASONING_KEYS = ("reasoning_content", "reasoning")
