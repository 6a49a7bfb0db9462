"""Large input files read as several pieces, so that one huge shard spreads over the cluster.

A JSONL file larger than ``input.split_bytes`` is cut at byte offsets; a piece holds the lines
whose first byte lies in its range (a line that crosses an offset belongs to the piece where it
starts). A line's number is its line in the file, so a piece must know how many newlines come
before its range: those are counted first, a task per range (``count_newlines``), and added up
in order. Blank lines are skipped but counted, as when the file is read whole.

A Parquet file larger than ``input.split_bytes`` is cut between row groups (never inside one);
its footer says how many rows come before each group.

Every piece then yields exactly the rows, numbers and errors that reading the file whole gives
for them (``io/shards.py``), so row accounting and ``source_file``/line provenance are the same
whether a file is split or not. Ray-free: ``io/datasource.py`` plans and reads the pieces.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Piece:
    """A part of an input file that one read task reads.

    Attributes:
        path: The file, inside its filesystem.
        fmt: ``jsonl`` or ``parquet``.
        size: Its share of the file's bytes (to balance read tasks).
        start: JSONL: the first byte of its range; Parquet: its first row group.
        stop: JSONL: the byte after its range; Parquet: the row group after its last one.
            None: to the end of the file (a file read whole is one piece, start 0).
        before: Rows before the piece: JSONL, the newlines before ``start``; Parquet, the rows
            of the groups before ``start``.
    """

    path: str
    fmt: str
    size: int
    start: int = 0
    stop: int | None = None
    before: int = 0

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop is None


def byte_ranges(size: int, split_bytes: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of about ``split_bytes`` that cover ``size`` bytes."""
    count = max(1, -(-size // split_bytes))
    edges = [size * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def count_newlines(f: Any, start: int, stop: int) -> int:
    """Newline bytes in ``[start, stop)`` of a seekable binary file."""
    f.seek(start)
    count, left = 0, stop - start
    while left > 0:
        chunk = f.read(min(_READ_CHUNK, left))
        if not chunk:
            break
        count += chunk.count(b"\n")
        left -= len(chunk)
    return count


def jsonl_pieces(path: str, ranges: list[tuple[int, int]], newlines: list[int]) -> list[Piece]:
    """The pieces of a JSONL file cut at ``ranges``, ``newlines`` counted in each."""
    pieces, before = [], 0
    for (start, stop), count in zip(ranges, newlines):
        last = stop == ranges[-1][1]
        pieces.append(Piece(path, "jsonl", stop - start, start, None if last else stop, before))
        before += count
    return pieces


def parquet_pieces(path: str, metadata: pq.FileMetaData, split_bytes: int) -> list[Piece]:
    """A Parquet file's pieces: consecutive row groups of about ``split_bytes`` (uncompressed)
    each, never fewer than one group."""
    pieces, start, before, size, rows = [], 0, 0, 0, 0
    groups = metadata.num_row_groups
    for group in range(groups):
        size += metadata.row_group(group).total_byte_size
        rows += metadata.row_group(group).num_rows
        if size >= split_bytes or group == groups - 1:
            stop = None if group == groups - 1 else group + 1
            pieces.append(Piece(path, "parquet", size, start, stop, before))
            start, before, size, rows = group + 1, before + rows, 0, 0
    return pieces or [Piece(path, "parquet", 0)]


def numbered_lines(f: Any, piece: Piece) -> Iterator[tuple[int, bytes]]:
    """The lines of a JSONL piece with their line numbers in the file (1-based), without the
    newline; a UTF-8 byte order mark before the file's first line is dropped."""
    if piece.start == 0:
        number, lines = 0, _split_lines(f, 0)
        first = next(lines, None)
        if first is not None:
            yield 1, first[1].removeprefix(codecs.BOM_UTF8)
            number = 1
    else:
        # The range's first line starts at its first byte if a newline comes just before it;
        # otherwise after the first newline in the range (a line begun before it is not ours).
        f.seek(piece.start - 1)
        at_line_start = f.read(1) == b"\n"
        lines = _split_lines(f, piece.start)
        number = piece.before
        if not at_line_start:
            skipped = next(lines, None)
            if skipped is None or not skipped[2]:
                return
            number += 1
    for offset, line, _ in lines:
        if piece.stop is not None and offset >= piece.stop:
            return
        number += 1
        yield number, line


def _split_lines(f: Any, offset: int) -> Iterator[tuple[int, bytes, bool]]:
    """Lines of a binary stream read from ``offset``: each line's offset, its bytes (without
    ``\\n`` or a trailing ``\\r``), and whether a newline ended it."""
    rest, start = b"", offset
    while True:
        chunk = f.read(_READ_CHUNK)
        if not chunk:
            break
        data = rest + chunk
        begin = 0
        while (end := data.find(b"\n", begin)) >= 0:
            yield start, data[begin:end].rstrip(b"\r"), True
            start += end + 1 - begin
            begin = end + 1
        rest = data[begin:]
    if rest:
        yield start, rest.rstrip(b"\r"), False
