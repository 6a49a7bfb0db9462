"""A folder on any fsspec filesystem, its files named relative to it.

``Folder`` is fsspec's ``DirFileSystem`` over the folder's filesystem (local, s3://, gs://...),
as datatrove's ``DataFolder`` is: code that receives one opens, lists, reads and writes by names
relative to it and never turns a path into a URL to parse it again. It pickles (its URL is its
state), so a Ray task receives it as it is. Ray Data and pyarrow read through ``full`` (the path
inside the underlying filesystem) and ``arrow_fs``.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.dirfs import DirFileSystem

from ln_ray.io import storage


class Folder(DirFileSystem):
    """A folder, addressed by names relative to it.

    Args:
        url: The folder: a local path or any fsspec URL.
    """

    def __init__(self, url: str, **_: Any) -> None:
        fs, path = storage.filesystem(url)
        super().__init__(path=path.rstrip("/") or "/", fs=fs)

    @property
    def url(self) -> str:
        """The folder's URL (a local path as it is); may carry credentials: redact to show."""
        return storage.full_url(self.fs, self.path)

    def url_of(self, *names: str) -> str:
        """The URL of ``names`` below the folder."""
        return storage.full_url(self.fs, self.full(*names))

    def full(self, *names: str) -> str:
        """The path of ``names`` below the folder inside the underlying filesystem (what Ray Data
        and pyarrow are given, with ``arrow_fs``)."""
        return posixpath.join(self.path, *names) if names else self.path

    @property
    def arrow_fs(self) -> Any:
        """The underlying filesystem for pyarrow and Ray Data (``storage.arrow_filesystem``)."""
        return storage.arrow_filesystem(self.fs)

    @property
    def protocol_name(self) -> str:
        return storage.protocol(self.fs)

    def parquet_files(self, name: str = "") -> list[str]:
        """Completed Parquet files below ``name`` (names relative to the folder, sorted; hidden
        temporaries left out)."""
        if not self.fs.exists(self.full(name)):
            return []
        return sorted(
            path
            for path in self.find(name)
            if path.endswith(".parquet") and not posixpath.basename(path).startswith(".")
        )

    def read_json(self, name: str) -> dict[str, Any]:
        with self.open(name, "r") as handle:
            return json.load(handle)

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        """Write a JSON document, atomically (``write_atomically``)."""
        text = json.dumps(payload, indent=2, sort_keys=True, default=str)

        def write(target: str) -> None:
            with self.fs.open(target, "w") as handle:
                handle.write(text)

        self.makedirs(posixpath.dirname(name) or "", exist_ok=True)
        self.write_atomically(name, write)

    def write_atomically(self, name: str, write: Callable[[str], None]) -> None:
        """Have ``write(target)`` produce ``name`` (``target``: a path inside the underlying
        filesystem); readers see the old file or the whole new one
        (``storage.write_atomically``)."""
        storage.write_atomically(self.fs, self.full(name), write)

    def read_table(
        self,
        name: str,
        columns: list[str] | None = None,
        schema: pa.Schema | None = None,
        filters: Any = None,
    ) -> pa.Table:
        """A Parquet file or folder below the folder, as one table (``columns`` only; the rows
        that pass ``filters``, in pyarrow's form, filtered while reading)."""
        return pq.read_table(
            self.full(name),
            columns=columns,
            schema=schema,
            filters=filters,
            filesystem=self.arrow_fs,
        )

    def batches(
        self, name: str, columns: list[str], batch_rows: int, schema: pa.Schema | None = None
    ) -> Iterator[pa.RecordBatch]:
        """A Parquet file or folder below the folder, streamed in batches of at most
        ``batch_rows`` rows (``columns`` only): memory bounded by a few batches, whatever its
        size. With ``schema``, a column its files lack reads as nulls."""
        import pyarrow.dataset as pads

        data = pads.dataset(
            self.full(name), format="parquet", filesystem=self.arrow_fs, schema=schema
        )
        return data.to_batches(
            columns=columns, batch_size=batch_rows, batch_readahead=1, fragment_readahead=1
        )

    def write_table(self, name: str, table: pa.Table) -> None:
        """One Parquet file, written atomically."""
        self.makedirs(posixpath.dirname(name) or "", exist_ok=True)
        arrow_fs = self.arrow_fs
        self.write_atomically(
            name, lambda target: pq.write_table(table, target, filesystem=arrow_fs)
        )

    def ensure_table(self, name: str, schema: pa.Schema) -> None:
        """Give a dataset that came out empty one empty Parquet file, so readers still see its
        schema (Ray Data writes no file at all for an empty dataset)."""
        if self.parquet_files(name):
            return
        self.makedirs(name, exist_ok=True)
        pq.write_table(
            schema.empty_table(), self.full(name, "part-0.parquet"), filesystem=self.arrow_fs
        )

    def remove(self, name: str = "") -> None:
        """Remove ``name`` (a file or a folder, with everything below it) if it exists."""
        if self.fs.exists(self.full(name)):
            self.fs.rm(self.full(name), recursive=True)
