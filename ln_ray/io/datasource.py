"""The Ray Data datasource that reads trace shards (``io/shards.py``) into the job, streaming.

Each read task reads a few pieces (``io/pieces.py``): whole files, or the parts of a file larger
than ``input.split_bytes`` (JSONL byte ranges, Parquet row groups), so that one huge shard
spreads over the cluster. ``plan_pieces`` cuts the files; a large JSONL file's newlines are
counted first, a Ray task per range, so each piece numbers its lines as the file does.
``shards.py`` and ``pieces.py`` have no Ray, so planning and tests read shards without it.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ln_ray.config import ColumnsConfig
from ln_ray.io.pieces import Piece, byte_ranges, count_newlines, jsonl_pieces, parquet_pieces
from ln_ray.io.shards import blocks, iter_jsonl, iter_parquet
from ln_ray.prepare.layout import PER_TRACE


def plan_pieces(
    files: list[tuple[str, str, int]], filesystem: Any, split_bytes: int, task_args: dict
) -> list[Piece]:
    """The pieces of ``files`` (path, format, size in bytes): a piece per file, or, for a file
    larger than ``split_bytes``, pieces of about that size.

    A large Parquet file is cut between row groups from its footer (read here); one whose footer
    cannot be read stays whole, so that its read reports why. A large JSONL file is cut into
    byte ranges whose newlines are counted by Ray tasks (``task_args``), in parallel.
    """
    import ray

    pieces: list[Piece] = []
    counting: list[tuple[str, list[tuple[int, int]], list[Any]]] = []
    count = ray.remote(_count_newlines).options(**task_args)
    for path, fmt, size in files:
        if size <= split_bytes:
            pieces.append(Piece(path, fmt, size))
        elif fmt == "parquet":
            pieces.extend(_parquet_pieces(filesystem, path, size, split_bytes))
        else:
            ranges = byte_ranges(size, split_bytes)
            counting.append((path, ranges, [count.remote(filesystem, path, r) for r in ranges]))
    for path, ranges, refs in counting:
        pieces.extend(jsonl_pieces(path, ranges, ray.get(refs)))
    return pieces


def _count_newlines(filesystem: Any, path: str, byte_range: tuple[int, int]) -> int:
    with filesystem.open_input_file(path) as handle:
        return count_newlines(handle, *byte_range)


def _parquet_pieces(filesystem: Any, path: str, size: int, split_bytes: int) -> list[Piece]:
    try:
        with filesystem.open_input_file(path) as handle:
            metadata = pq.ParquetFile(handle).metadata
    except Exception:  # read whole: its read task reports the error
        return [Piece(path, "parquet", size)]
    return parquet_pieces(path, metadata, split_bytes)


class TraceShardDatasource(Datasource):
    """A Ray Data datasource over the pieces of trace shards, a few pieces per read task.

    Args:
        pieces: What to read (``plan_pieces``).
        urls: The URL recorded as ``source_file`` per path (with its protocol).
        columns: Names of the input columns.
        filesystem: The pyarrow filesystem the paths are in.
        from_path: The fields each path names (``layout.path_fields``), given to its rows.
        layout: ``input.layout`` (``per_prompt``: a row's responses are read as its traces).
    """

    def __init__(
        self,
        pieces: list[Piece],
        urls: dict[str, str],
        columns: ColumnsConfig,
        filesystem: Any,
        from_path: dict[str, dict[str, str]] | None = None,
        layout: str = PER_TRACE,
    ) -> None:
        self._pieces = pieces
        self._urls = urls
        self._columns = columns
        self._filesystem = filesystem
        self._from_path = from_path or {}
        self._layout = layout

    def estimate_inmemory_data_size(self) -> int:
        return sum(piece.size for piece in self._pieces)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        """At most ``parallelism`` tasks, the pieces dealt out largest first to the task with
        the fewest bytes so far (files in their order within a task)."""
        tasks: list[tuple[int, int, list[int]]] = [(0, i, []) for i in range(max(1, parallelism))]
        order = sorted(range(len(self._pieces)), key=lambda i: -self._pieces[i].size)
        for index in order:
            size, task, held = heapq.heappop(tasks)
            held.append(index)
            heapq.heappush(tasks, (size + self._pieces[index].size, task, held))
        read_tasks = []
        for size, _, held in sorted(tasks, key=lambda t: t[1]):
            if not held:
                continue
            pieces = [self._pieces[i] for i in sorted(held)]
            metadata = BlockMetadata(
                num_rows=None,
                size_bytes=size,
                input_files=list(dict.fromkeys(piece.path for piece in pieces)),
                exec_stats=None,
            )
            fields = {p.path: self._from_path[p.path] for p in pieces if p.path in self._from_path}
            read = functools.partial(
                _read_pieces,
                pieces,
                self._urls,
                self._columns,
                self._filesystem,
                fields,
                self._layout,
            )
            read_tasks.append(ReadTask(read, metadata, per_task_row_limit=per_task_row_limit))
        return read_tasks


def _read_pieces(
    pieces: list[Piece],
    urls: dict[str, str],
    columns: ColumnsConfig,
    filesystem: Any,
    from_path: dict[str, dict[str, str]],
    layout: str,
) -> Iterator[pa.Table]:
    for piece in pieces:
        source = urls.get(piece.path, piece.path)
        if piece.fmt == "parquet" or not piece.whole:
            handle = filesystem.open_input_file(piece.path)  # random access
        else:
            handle = filesystem.open_input_stream(piece.path)
        with handle:
            fields = from_path.get(piece.path)
            if piece.fmt == "parquet":
                rows = iter_parquet(handle, columns, piece, fields, layout)
            else:
                rows = iter_jsonl(handle, columns, piece, fields, layout)
            yield from blocks(rows, source)
