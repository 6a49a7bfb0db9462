"""The Ray Data datasource that reads trace shards (``io/shards.py``) into the job, one file per
read task, streaming; ``shards.py`` itself has no Ray, so planning and tests read shards without
it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from ln_ray.config import ColumnsConfig
from ln_ray.io.shards import bare, blocks, iter_jsonl, iter_parquet


class TraceShardDatasource(FileBasedDatasource):
    """A Ray Data datasource over trace shards (each file is read by one task, streaming).

    Args:
        paths: Files to read (inside ``filesystem``).
        formats: ``parquet`` or ``jsonl`` per path.
        urls: The URL recorded as ``source_file`` per path (with its protocol).
        columns: Names of the input columns.
        **kwargs: Passed to FileBasedDatasource (``filesystem``).
    """

    def __init__(
        self,
        paths: list[str],
        formats: dict[str, str],
        urls: dict[str, str],
        columns: ColumnsConfig,
        **kwargs: Any,
    ) -> None:
        super().__init__(paths, **kwargs)
        self._formats = {bare(p): fmt for p, fmt in formats.items()}
        self._urls = {bare(p): url for p, url in urls.items()}
        self._columns = columns

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> pa.NativeFile:
        # Parquet needs random access (the footer comes first); JSONL streams.
        if self._formats.get(bare(path)) == "parquet":
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        fmt = self._formats.get(bare(path), "jsonl")
        source = self._urls.get(bare(path), path)
        rows = iter_parquet(f, self._columns) if fmt == "parquet" else iter_jsonl(f, self._columns)
        yield from blocks(rows, source)
