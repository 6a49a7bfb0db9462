"""Read Parquet and JSONL shards row by row into the canonical raw layout, with provenance.

Each record becomes its canonical rows (``canonical``). Every row keeps its source file and
1-based row number (the line number in JSONL), so a row that is rejected anywhere later can be
found again; a row of a ``per_prompt`` input holds several traces, each with its ``item`` (its
index in the row's list of responses). A bad line (invalid JSON, not UTF-8, not an object) or a
value of the wrong type becomes a row with ``read_error`` set, and the rest of the file is still
read; so does each row of a Parquet row group that cannot be read. A shard that cannot be
opened at all becomes a single such row (row number null).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ln_ray.config import ColumnsConfig
from ln_ray.io import jsontext
from ln_ray.io.canonical import canonical_rows, error_row
from ln_ray.io.pieces import Piece, numbered_lines
from ln_ray.prepare.layout import PER_TRACE
from ln_ray.schema import RAW_SCHEMA

BLOCK_ROWS = 256
_READ_CHUNK = 1 << 20


def iter_jsonl(
    f: Any,
    columns: ColumnsConfig,
    piece: Piece | None = None,
    from_path: dict[str, str] | None = None,
    layout: str = PER_TRACE,
) -> Iterator[dict[str, Any]]:
    """Canonical rows of a JSONL stream (or of one ``piece`` of the file, which must then be
    seekable); line numbers are 1-based lines of the file, blank lines are skipped.
    ``from_path``: the fields the file's path names (``path_fields``), given to every row.
    ``layout``: ``per_trace`` (a row is a trace) or ``per_prompt`` (``canonical_rows``).

    A line is parsed by orjson where it gives what the standard library gives (``jsontext``);
    any other line goes to ``json``, which also says what is wrong with a bad one.
    """
    for number, line in numbered_lines(f, piece or Piece("", "jsonl", 0)):
        if not line.strip():
            continue
        record = jsontext.loads_native(line)
        if isinstance(record, dict):
            yield from canonical_rows(record, columns, number, layout, from_path, native=True)
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield error_row(number, "line is not valid UTF-8")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            yield error_row(number, f"invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        except ValueError as exc:  # e.g. an integer with more digits than Python converts
            yield error_row(number, f"invalid JSON: {exc}")
            continue
        except RecursionError:
            yield error_row(number, "invalid JSON: nested too deeply")
            continue
        if not isinstance(record, dict):
            yield error_row(number, "line is not a JSON object")
            continue
        yield from canonical_rows(record, columns, number, layout, from_path)


def iter_parquet(
    f: Any,
    columns: ColumnsConfig,
    piece: Piece | None = None,
    from_path: dict[str, str] | None = None,
    layout: str = PER_TRACE,
) -> Iterator[dict[str, Any]]:
    """Canonical rows of a Parquet file (or of one ``piece``: a range of its row groups); row
    numbers are 1-based rows of the file. ``from_path`` and ``layout`` as for ``iter_jsonl``.

    Row groups are read one at a time, so a corrupt one costs only its own rows: each of them
    becomes a row with ``read_error`` and its row number (known from the footer), and every row
    in the file is still accounted for.
    """
    piece = piece or Piece("", "parquet", 0)
    try:
        parquet = pq.ParquetFile(f)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        yield error_row(None, f"cannot read Parquet shard: {exc}")
        return
    groups = parquet.metadata.num_row_groups
    start = piece.before + 1
    for group in range(piece.start, groups if piece.stop is None else piece.stop):
        end = start + parquet.metadata.row_group(group).num_rows
        number = start
        try:
            for batch in parquet.iter_batches(batch_size=BLOCK_ROWS, row_groups=[group]):
                for record in batch.to_pylist():
                    yield from canonical_rows(record, columns, number, layout, from_path)
                    number += 1
        except Exception as exc:
            reason = (
                f"cannot read Parquet row group: group {group + 1} of {groups} "
                f"(rows {start}-{end - 1}): {' '.join(str(exc).split())}"
            )
            for lost in range(number, end):
                yield error_row(lost, reason)
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
        return {**error_row(row["row_number"], reason), "source_file": row["source_file"]}
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
