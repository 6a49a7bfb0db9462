"""Filesystems and paths for any fsspec URL (local, s3://, gs://, ...).

Credentials come from the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, instance roles),
never from config files. Ray Data gets the same fsspec filesystem wrapped as a pyarrow one.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import fsspec
from fsspec.core import url_to_fs

from ln_ray.prepare import layout

log = logging.getLogger(__name__)

INPUT_SUFFIXES = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}


# A URL's userinfo (``s3://KEY:SECRET@bucket``); RE2 syntax too, for Arrow's regex kernels.
USERINFO, MASKED = r"://[^/@\s]+@", "://***@"
# A URL's query-string credentials: a presigned URL's signature and credential (S3's
# X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token; GCS's X-Goog-*), an Azure SAS token's
# sig, an access token or key. The parameter's name is kept, its value masked.
SECRET_PARAMETER = (
    r"(?i)([?&;][a-z0-9_.\-]*(?:sig|credential|token|secret|passw|pwd|auth|key)"
    r"[a-z0-9_.\-]*=)[^&#;\s'\"]+"
)
MASKED_PARAMETER = r"\1***"


class InputError(ValueError):
    """The run's input cannot be used at all (no files, unknown format)."""


class InputFiles(NamedTuple):
    """What an input path expands to: files to read with their format, and files left out."""

    files: list[tuple[str, str]]
    skipped: list[str]  # files whose suffix names no input format (input.format auto)


class Inputs(NamedTuple):
    """A run's input files, on one filesystem."""

    fs: fsspec.AbstractFileSystem
    files: list[tuple[str, str]]  # (path inside ``fs``, format), sorted
    skipped: list[str]

    @classmethod
    def list(cls, url: str, input_format: str = "auto") -> Inputs:
        """The files ``url`` expands to (``list_input_files``)."""
        fs, _ = filesystem(url)
        files, skipped = list_input_files(url, input_format)
        return cls(fs, files, skipped)

    def url(self, path: str) -> str:
        """A file's URL, to open it (it may carry credentials)."""
        return full_url(self.fs, path)

    def shown(self, path: str) -> str:
        """A file's URL as it is recorded and shown (``source_file``): credentials masked."""
        return redact_url(full_url(self.fs, path))

    def path_fields(self, spec: str | None) -> dict[str, dict[str, str]]:
        """What each file's path names under ``input.teacher_from_path`` (``layout.path_fields``;
        nothing when it is unset).

        Raises:
            InputError: A file's path names no teacher (the message names the file).
        """
        if spec is None:
            return {}
        try:
            return {path: layout.path_fields(path, spec) for path, _ in self.files}
        except layout.PathFieldsError as exc:
            raise InputError(str(exc)) from None


def redact_url(text: str) -> str:
    """``text`` with the credentials of every URL in it masked: userinfo (``s3://***@bucket``)
    and query-string secrets (``?X-Amz-Signature=***``, ``&sig=***``)."""
    return re.sub(SECRET_PARAMETER, MASKED_PARAMETER, re.sub(USERINFO, MASKED, text))


def redacted(tree: Any) -> Any:
    """A copy of ``tree`` (nested dicts and lists, as a config or a manifest) with every URL's
    credentials masked."""
    if isinstance(tree, dict):
        return {k: redacted(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redacted(v) for v in tree]
    if isinstance(tree, str):
        return redact_url(tree)
    return tree


def redact_urls_arrow(texts: Any) -> Any:
    """``redact_url`` over an Arrow string array (nulls stay null)."""
    import pyarrow.compute as pc

    texts = pc.replace_substring_regex(texts, USERINFO, MASKED)
    return pc.replace_substring_regex(texts, SECRET_PARAMETER, MASKED_PARAMETER)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it."""
    fs, path = url_to_fs(url)
    return fs, path


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> Any:
    """The filesystem for Ray Data and pyarrow: Arrow's own for local files (its reads and
    writes run in C++, without Python's lock), else the fsspec filesystem wrapped."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    if protocol(fs) == "file":
        return LocalFileSystem()
    return PyFileSystem(FSSpecHandler(fs))


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as a URL with its protocol (``s3://bucket/key``), or a local path as is."""
    return fs.unstrip_protocol(path) if protocol(fs) != "file" else path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path."""
    return posixpath.join(url.rstrip("/"), *parts)


def list_input_files(url: str, input_format: str = "auto") -> InputFiles:
    """Expand a file, folder or glob into ``(path, format)`` pairs, sorted.

    Below a folder or a glob's fixed part, a path with a component starting with ``_`` or ``.``
    is not input: that is where ln-ray and other tools keep working data (``_cache/``,
    ``_SUCCESS``, ``.crc``). A file with an unknown suffix is skipped with a warning.

    Args:
        url: A file, a folder (searched recursively) or a glob, on any fsspec filesystem.
        input_format: ``auto`` (by file suffix), ``parquet`` or ``jsonl``.

    Returns:
        Paths inside the filesystem (no protocol) with their format, and the skipped files.

    Raises:
        InputError: When nothing readable matches.
    """
    fs, path = filesystem(url)
    if _is_glob(path):
        candidates = sorted(fs.glob(path))
    elif fs.isdir(path):
        candidates = sorted(fs.find(path))
    elif fs.exists(path):
        candidates = [path]
    else:
        raise InputError(
            f"input.path {url!r} does not exist: set input.path to the traces' file, folder or "
            "glob (a local path, or an s3://, gs:// ... URL)"
        )
    root = _input_root(path)
    files, skipped = [], []
    for candidate in candidates:
        if _is_hidden(candidate, root) or fs.isdir(candidate):
            continue
        fmt = input_format if input_format != "auto" else _format_of(candidate)
        if fmt is None:
            skipped.append(candidate)
        else:
            files.append((candidate, fmt))
    if skipped:
        log.warning(
            "skipping %d files under %s with no known suffix (set input.format to read them): %s",
            len(skipped),
            redact_url(url),
            redact_url(", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")),
        )
    if not files:
        raise InputError(
            f"no input files under {url!r} (looked for {sorted(INPUT_SUFFIXES)}; "
            "set input.format for other names)"
        )
    return InputFiles(files, skipped)


def check_output_apart(input_url: str, output_url: str) -> None:
    """Refuse an output path inside the input folder: a later run would read the outputs back.

    Raises:
        InputError: When ``output_url`` is the input folder (or a glob's fixed folder) or lies
            below it, on the same filesystem.
    """
    in_fs, in_path = filesystem(input_url)
    out_fs, out_path = filesystem(output_url)
    if protocol(in_fs) != protocol(out_fs):
        return
    root, inner = _input_root(in_path), out_path.rstrip("/")
    if protocol(in_fs) == "file":
        root, inner = os.path.realpath(root), os.path.realpath(inner)
    if inner == root or inner.startswith(root.rstrip("/") + "/"):
        raise InputError(
            f"output.path {output_url!r} is inside input.path {input_url!r}: later runs would "
            "read the outputs as input; write them elsewhere"
        )


def write_atomically(fs: Any, path: str, write: Callable[[str], None]) -> None:
    """Have ``write(target)`` produce ``path``; readers see the old file or the whole new one.

    On a local disk it writes a hidden temporary of its own (writers racing on one path never
    share one), renamed into place and removed if anything fails; an object store makes an object
    visible only once its upload completes, so there it writes ``path`` itself.
    """
    if protocol(fs) != "file":
        write(path)
        return
    folder, name = posixpath.split(path)
    tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex}")
    try:
        write(tmp)
        fs.mv(tmp, path)  # a rename
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def _is_glob(path: str) -> bool:
    return any(ch in _without_query(path) for ch in "*?[")


def _without_query(path: str) -> str:
    """An HTTP(S) URL without its query string (a presigned URL's ``?X-Amz-...``), which holds
    no glob and names no format; any other path as it is."""
    return path.split("?", 1)[0] if path.startswith(("http://", "https://")) else path


def _input_root(path: str) -> str:
    """The folder a listing starts from: the path itself, or a glob's fixed leading folders."""
    if _is_glob(path):
        path = posixpath.dirname(re.split(r"[*?[]", path, maxsplit=1)[0])
    return path.rstrip("/") or "/"


def _is_hidden(path: str, root: str) -> bool:
    """Whether a component of ``path`` below ``root`` starts with ``_`` or ``.`` (a file named
    as the input itself is read whatever its name)."""
    if path == root:
        return False
    prefix = root.rstrip("/") + "/"
    inside = path[len(prefix) :] if path.startswith(prefix) else posixpath.basename(path)
    return any(name.startswith((".", "_")) for name in inside.split("/"))


def _format_of(name: str) -> str | None:
    name = _without_query(name)
    for suffix, fmt in INPUT_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    return None


def protocol(fs: fsspec.AbstractFileSystem) -> str:
    """The filesystem's main protocol name (``file``, ``s3``, ``gcs``...)."""
    proto = fs.protocol
    return proto if isinstance(proto, str) else proto[0]
