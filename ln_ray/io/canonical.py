"""One input record as the canonical raw rows: its columns mapped onto canonical names, a
value of the wrong type made the row's ``read_error``, and a ``per_prompt`` row exploded into
its traces. Ray-free; ``shards`` reads files into records.
"""

from __future__ import annotations

import math
from typing import Any

from ln_ray.config import ColumnsConfig
from ln_ray.io import jsontext
from ln_ray.prepare.layout import PER_PROMPT, PER_TRACE, nested_field, other_columns


def canonical_rows(
    record: dict[str, Any],
    columns: ColumnsConfig,
    number: int,
    layout: str = PER_TRACE,
    from_path: dict[str, str] | None = None,
    native: bool = False,
) -> list[dict[str, Any]]:
    """The canonical rows of one input row: itself (``per_trace``), or one per response in its
    list of responses (``per_prompt``), each with its ``item``.

    In a ``per_prompt`` row, ``columns.responses`` holds the responses to its prompt (the
    prompt column, and system; its messages column is not read); the teacher, correct,
    reasoning and steps columns may each hold a list parallel to them (one value per response)
    or, except steps, one value for all. A trace whose teacher nothing names is the list's
    ``generations[i]``. Lists of different lengths, or no list of responses, make one row
    with ``read_error`` (item null): never a truncation.
    """
    if layout != PER_PROMPT:
        return [canonical_row(record, columns, number, native, from_path)]
    responses = nested_field(record, columns.responses)
    if not isinstance(responses, list | tuple) or not responses:
        what = "is missing" if responses is None else "is not a non-empty list"
        return [error_row(number, f"{columns.responses} {what} (input.layout=per_prompt)")]
    parallel = {
        columns.response: responses,
        **{
            name: value
            for name, value in _list_columns(record, columns).items()
            if isinstance(value, list | tuple)
        },
    }
    lengths = {name: len(value) for name, value in parallel.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(
            f"{columns.responses if name == columns.response else name} {n}"
            for name, n in lengths.items()
        )
        return [error_row(number, f"per_prompt lists differ in length: {shown}")]
    # The lists leave the row (a copy of every response in each trace's other columns would
    # cost the square of the row's size).
    shared = other_columns(record, [columns.responses, *parallel])
    # The context is the prompt column (a messages column there, as in OpenR1-Math, holds one
    # of the responses already).
    shared[columns.messages] = None
    rows = []
    for item in range(len(responses)):
        one = {**shared, **{name: value[item] for name, value in parallel.items()}}
        row = canonical_row(one, columns, number, native, from_path)
        if row["teacher"] is None and not row["read_error"]:
            row["teacher"] = f"{columns.responses}[{item}]"
        row["item"] = item
        rows.append(row)
    return rows


def _list_columns(record: dict[str, Any], columns: ColumnsConfig) -> dict[str, Any]:
    """The values of the columns that may hold one value per response in a per_prompt row."""
    names = (columns.teacher, columns.correct, columns.reasoning, columns.steps)
    values = {name: nested_field(record, name) for name in names}
    steps = values[columns.steps]
    if isinstance(steps, list | tuple) and steps and isinstance(steps[0], str):
        del values[columns.steps]  # one list of steps is not one per response
    return values


def canonical_row(
    record: dict[str, Any],
    columns: ColumnsConfig,
    number: int,
    native: bool = False,
    from_path: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Map a user record onto the canonical columns; a value of the wrong type sets read_error.

    A column name with dots names a nested field (``info.think_content``) unless the record has
    a column of that very name; the fields it takes leave the copy of their column kept with the
    other input columns (``extra``).

    Args:
        record: One input row.
        columns: The input's column names.
        number: Its 1-based row number in its file.
        native: The record came from ``jsontext.loads_native`` (its text is valid Unicode, and
            orjson writes its values back).
        from_path: The fields its file's path names (``path_fields``: the teacher, and a prompt
            set that prefixes the prompt_id).
    """
    names = {
        "prompt_id": columns.prompt_id,
        "prompt": columns.prompt,
        "teacher": columns.teacher,
        "response": columns.response,
        "reasoning": columns.reasoning,
        "steps": columns.steps,
        "correct": columns.correct,
        "messages": columns.messages,
        "system": columns.system,
    }
    row: dict[str, Any] = {key: nested_field(record, name) for key, name in names.items()}
    row["row_number"] = number
    row["read_error"] = None
    problems = _take_teacher(row, from_path["teacher"]) if from_path else []
    for key in ("prompt", "teacher", "response", "reasoning", "system"):
        if row[key] is not None and not isinstance(row[key], str):
            problems.append(f"{key} is not a string")
            row[key] = None
    prompt_id = row["prompt_id"]
    if isinstance(prompt_id, float):
        # Parquet holds integer ids with gaps as float64 (1.0 is JSONL's 1), and NaN is how
        # pandas and json.dumps write a missing one.
        if not math.isfinite(prompt_id):
            row["prompt_id"] = None
        elif prompt_id.is_integer():
            row["prompt_id"] = str(int(prompt_id))
        else:
            problems.append("prompt_id is a number with a fraction")
            row["prompt_id"] = repr(prompt_id)
    elif isinstance(prompt_id, int) and not isinstance(prompt_id, bool):
        row["prompt_id"] = str(prompt_id)
    elif prompt_id is not None and not isinstance(prompt_id, str):
        problems.append("prompt_id is not a string or number")
        row["prompt_id"] = None
    prompt_set = (from_path or {}).get("prompt_set")
    if prompt_set is not None and isinstance(row["prompt_id"], str):
        # Sets that number their prompts alike (1, 2, ...) stay apart.
        row["prompt_id"] = f"{prompt_set}/{row['prompt_id']}"
    steps = row["steps"]
    if steps is not None and (
        not isinstance(steps, list | tuple) or not all(isinstance(s, str) for s in steps)
    ):
        problems.append("steps is not a list of strings")
        row["steps"] = None
    if row["correct"] is not None and not isinstance(row["correct"], bool):
        problems.append("correct is not a boolean")
        row["correct"] = None
    messages = row["messages"]
    if messages is not None and not isinstance(messages, str):
        row["messages"] = _json_text(messages, native)
        if row["messages"] is None:
            problems.append("messages nests too deeply")
    extra = other_columns(record, names.values())
    row["extra"] = _json_text(extra, native) if extra else None
    if extra and row["extra"] is None:
        problems.append("a column nests too deeply")
    for key in () if native else _TEXT_KEYS:  # orjson refuses text that is not Unicode
        if not _is_utf8(row[key]):
            # JSON can escape a lone surrogate ("\ud800"), which no UTF-8 text can hold.
            problems.append(f"{'a column' if key == 'extra' else key} is not valid Unicode")
            row[key] = None
    if problems:
        row["read_error"] = "; ".join(problems)
    return row


_TEXT_KEYS = (
    *("prompt_id", "prompt", "teacher", "response", "reasoning", "system"),
    *("steps", "messages", "extra"),
)


def _take_teacher(row: dict[str, Any], teacher: str) -> list[str]:
    """Give the row its path's teacher; a teacher column must agree with it."""
    if row["teacher"] is None:
        row["teacher"] = teacher
    elif row["teacher"] != teacher:
        return [f"teacher {row['teacher']!r} differs from its path's {teacher!r}"]
    return []


def error_row(number: int | None, reason: str) -> dict[str, Any]:
    return {"row_number": number, "read_error": reason}


def _json_text(value: Any, native: bool) -> str | None:
    """``value`` as JSON text, or None when it nests deeper than the encoder recurses."""
    try:
        return jsontext.dumps(value, native)
    except (RecursionError, ValueError):
        return None


def _is_utf8(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    elif isinstance(value, list | tuple):
        return all(_is_utf8(item) for item in value)
    return True
