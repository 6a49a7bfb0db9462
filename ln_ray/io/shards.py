"""Read Parquet and JSONL shards row by row into the canonical raw layout, with provenance.

Every row keeps its source file and 1-based row number (the line number in JSONL), so a row that
is rejected anywhere later can be found again. A bad line (invalid JSON, not UTF-8, not an object)
or a value of the wrong type becomes a row with ``read_error`` set, and the rest of the file is
still read; so does each row of a Parquet row group that cannot be read. A shard that cannot be
opened at all becomes a single such row (row number null).
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ln_ray.config import ColumnsConfig
from ln_ray.io import jsontext
from ln_ray.io.pieces import Piece, numbered_lines
from ln_ray.prepare.layout import nested_field, other_columns
from ln_ray.schema import RAW_SCHEMA

BLOCK_ROWS = 256
_READ_CHUNK = 1 << 20


def iter_jsonl(
    f: Any,
    columns: ColumnsConfig,
    piece: Piece | None = None,
    from_path: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Canonical rows of a JSONL stream (or of one ``piece`` of the file, which must then be
    seekable); line numbers are 1-based lines of the file, blank lines are skipped.
    ``from_path``: the fields the file's path names (``path_fields``), given to every row.

    A line is parsed by orjson where it gives what the standard library gives (``jsontext``);
    any other line goes to ``json``, which also says what is wrong with a bad one.
    """
    for number, line in numbered_lines(f, piece or Piece("", "jsonl", 0)):
        if not line.strip():
            continue
        record = jsontext.loads_native(line)
        if isinstance(record, dict):
            yield canonical_row(record, columns, number, native=True, from_path=from_path)
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield _error_row(number, "line is not valid UTF-8")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            yield _error_row(number, f"invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        except ValueError as exc:  # e.g. an integer with more digits than Python converts
            yield _error_row(number, f"invalid JSON: {exc}")
            continue
        except RecursionError:
            yield _error_row(number, "invalid JSON: nested too deeply")
            continue
        if not isinstance(record, dict):
            yield _error_row(number, "line is not a JSON object")
            continue
        yield canonical_row(record, columns, number, from_path=from_path)


def iter_parquet(
    f: Any,
    columns: ColumnsConfig,
    piece: Piece | None = None,
    from_path: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Canonical rows of a Parquet file (or of one ``piece``: a range of its row groups); row
    numbers are 1-based rows of the file. ``from_path`` as for ``iter_jsonl``.

    Row groups are read one at a time, so a corrupt one costs only its own rows: each of them
    becomes a row with ``read_error`` and its row number (known from the footer), and every row
    in the file is still accounted for.
    """
    piece = piece or Piece("", "parquet", 0)
    try:
        parquet = pq.ParquetFile(f)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        yield _error_row(None, f"cannot read Parquet shard: {exc}")
        return
    groups = parquet.metadata.num_row_groups
    start = piece.before + 1
    for group in range(piece.start, groups if piece.stop is None else piece.stop):
        end = start + parquet.metadata.row_group(group).num_rows
        number = start
        try:
            for batch in parquet.iter_batches(batch_size=BLOCK_ROWS, row_groups=[group]):
                for record in batch.to_pylist():
                    yield canonical_row(record, columns, number, from_path=from_path)
                    number += 1
        except Exception as exc:
            reason = (
                f"cannot read Parquet row group: group {group + 1} of {groups} "
                f"(rows {start}-{end - 1}): {' '.join(str(exc).split())}"
            )
            for lost in range(number, end):
                yield _error_row(lost, reason)
        start = end


def count_source_rows(url: str, fmt: str) -> dict[str, Any]:
    """Rows in one shard, counted without parsing rows: Parquet metadata, or non-blank lines.

    Returns:
        ``{"rows_in_file": n}``, or ``{"rows_in_file": None, "unreadable": reason}``.
    """
    from ln_ray.io import storage

    fs, path = storage.filesystem(url)
    try:
        with fs.open(path, "rb") as handle:
            if fmt == "parquet":
                return {"rows_in_file": pq.ParquetFile(handle).metadata.num_rows}
            return {"rows_in_file": count_lines(handle)}
    except Exception as exc:
        return {"rows_in_file": None, "unreadable": f"{type(exc).__name__}: {exc}"}


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


def _error_row(number: int | None, reason: str) -> dict[str, Any]:
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


def blocks(rows: Iterator[dict[str, Any]], source: str) -> Iterator[pa.Table]:
    """Raw rows as Arrow blocks of ``BLOCK_ROWS``, each row's ``source_file`` set to
    ``source``."""
    batch: list[dict[str, Any]] = []
    for row in rows:
        row["source_file"] = source
        batch.append(row)
        if len(batch) >= BLOCK_ROWS:
            yield _block(batch)
            batch = []
    if batch:
        yield _block(batch)


def _block(rows: list[dict[str, Any]]) -> pa.Table:
    """An Arrow block of raw rows; a row that Arrow still cannot store becomes that row's error
    instead of failing its whole shard."""
    try:
        return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
    except Exception:
        return pa.Table.from_pylist([_storable(row) for row in rows], schema=RAW_SCHEMA)


def _storable(row: dict[str, Any]) -> dict[str, Any]:
    try:
        pa.Table.from_pylist([row], schema=RAW_SCHEMA)
    except Exception as exc:
        detail = str(exc).encode("utf-8", "backslashreplace").decode("utf-8")
        reason = f"row cannot be stored: {type(exc).__name__}: {detail}"
        return {**_error_row(row["row_number"], reason), "source_file": row["source_file"]}
    return row


_SPACE = np.zeros(256, dtype=bool)  # the bytes bytes.strip() strips
_SPACE[list(b" \t\n\r\f\v")] = True


def count_lines(f: Any) -> int:
    """Non-blank lines in a binary stream (as ``iter_jsonl`` numbers them), counted over chunks
    with NumPy: a line becomes a Python object only when it starts with white space."""
    count, rest, start = 0, b"", True
    while True:
        chunk = f.read(_READ_CHUNK)
        data = rest + chunk
        if start and (len(data) >= len(codecs.BOM_UTF8) or not chunk):
            data, start = data.removeprefix(codecs.BOM_UTF8), False
        if not chunk:
            return count + _text_lines(data)
        end = data.rfind(b"\n") + 1 if not start else 0  # whole lines; the rest waits
        count += _text_lines(data[:end])
        rest = data[end:]


def _text_lines(data: bytes) -> int:
    """Non-blank lines in ``data``, which starts at a line's start.

    A line that starts with text counts as it is; only the few that start with white space (or
    are empty) are looked at one by one.
    """
    if not data:
        return 0
    codes = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(codes == ord("\n"))
    starts = np.concatenate([[0], newlines + 1])
    starts = starts[starts < len(data)]
    spaced = _SPACE[codes[starts]]
    ends = np.append(newlines, len(data))[np.searchsorted(newlines, starts[spaced])]
    rest = sum(1 for a, b in zip(starts[spaced].tolist(), ends.tolist()) if data[a:b].strip())
    return int(np.count_nonzero(~spaced)) + rest


def bare(path: str) -> str:
    """A path or URL without its protocol and leading slashes (how paths are matched)."""
    return path.split("://", 1)[-1].lstrip("/")
