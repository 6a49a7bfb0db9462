"""Filesystems and paths for any fsspec URL (local, s3://, gs://, ...).

Credentials come from the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, instance roles),
never from config files. Ray Data gets the same fsspec filesystem wrapped as a pyarrow one.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs

INPUT_SUFFIXES = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}


class InputError(ValueError):
    """The run's input cannot be used at all (no files, unknown format)."""


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it."""
    fs, path = url_to_fs(url)
    return fs, path


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> Any:
    """Wrap an fsspec filesystem for Ray Data and pyarrow."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as a URL with its protocol (``s3://bucket/key``), or a local path as is."""
    return fs.unstrip_protocol(path) if protocol(fs) != "file" else path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path."""
    return posixpath.join(url.rstrip("/"), *parts)


def list_input_files(url: str, input_format: str = "auto") -> list[tuple[str, str]]:
    """Expand a file, folder or glob into ``(path, format)`` pairs, sorted.

    Args:
        url: A file, a folder (searched recursively) or a glob, on any fsspec filesystem.
        input_format: ``auto`` (by file suffix), ``parquet`` or ``jsonl``.

    Returns:
        Paths inside the filesystem (no protocol) with their format.

    Raises:
        InputError: When nothing readable matches.
    """
    fs, path = filesystem(url)
    if any(ch in path for ch in "*?["):
        candidates = sorted(fs.glob(path))
    elif fs.isdir(path):
        candidates = sorted(fs.find(path))
    elif fs.exists(path):
        candidates = [path]
    else:
        raise InputError(f"input.path {url!r} does not exist")
    files = []
    for candidate in candidates:
        name = posixpath.basename(candidate)
        if name.startswith((".", "_")) or fs.isdir(candidate):
            continue
        fmt = input_format if input_format != "auto" else _format_of(name)
        if fmt is not None:
            files.append((candidate, fmt))
    if not files:
        raise InputError(
            f"no input files under {url!r} (looked for {sorted(INPUT_SUFFIXES)}; "
            "set input.format for other names)"
        )
    return files


def write_json(url: str, payload: dict[str, Any]) -> None:
    """Write a JSON document to any fsspec URL, atomically where the filesystem allows."""
    fs, path = filesystem(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    text = json.dumps(payload, indent=2, sort_keys=True, default=str)
    if protocol(fs) == "file":
        tmp = path + ".tmp"
        with fs.open(tmp, "w") as handle:
            handle.write(text)
        fs.mv(tmp, path)
    else:  # object stores publish a whole object at once
        with fs.open(path, "w") as handle:
            handle.write(text)


def read_json(url: str) -> dict[str, Any]:
    fs, path = filesystem(url)
    with fs.open(path, "r") as handle:
        return json.load(handle)


def _format_of(name: str) -> str | None:
    for suffix, fmt in INPUT_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    return None


def protocol(fs: fsspec.AbstractFileSystem) -> str:
    """The filesystem's main protocol name (``file``, ``s3``, ``gcs``...)."""
    proto = fs.protocol
    return proto if isinstance(proto, str) else proto[0]
