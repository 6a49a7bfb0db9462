"""Where the output's lease lives (``io/lease.py``): the record, and a store per kind of
filesystem that creates, replaces and deletes it atomically.

Each store's ``create(data)`` and ``replace(data, expected)`` raise ``Taken`` when another
writer got there first; both return the token (bytes or ETag) that the next ``replace`` or
``delete`` must present.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from ln_ray.io import storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseRecord:
    """What the lease object holds."""

    run_id: str
    owner: str  # host:pid of the driver
    command: str
    started: float  # seconds since the epoch, by the holder's clock
    heartbeat: float
    timeout_s: float

    def stale(self, now: float) -> bool:
        """Whether its holder has missed its heartbeat for longer than its timeout."""
        return now - self.heartbeat > self.timeout_s

    def describe(self, now: float) -> str:
        return (
            f"run {self.run_id} ({self.command}, {self.owner}, started {iso(self.started)}, "
            f"last heartbeat {now - self.heartbeat:.0f}s ago)"
        )


class Taken(Exception):
    """A conditional write lost its race."""


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def encode(record: LeaseRecord) -> bytes:
    """A lease record as the lease object holds it."""
    return json.dumps(asdict(record), sort_keys=True).encode()


def decode(data: bytes) -> LeaseRecord:
    """The lease record in a lease object's bytes."""
    return LeaseRecord(**json.loads(data))


def store_for(fs: Any, path: str) -> Any:
    """The store that takes and replaces the lease object at ``path`` atomically on ``fs``
    (a plain one, with a warning, where the filesystem has no atomic conditional write)."""
    kind = storage.protocol(fs)
    if kind == "file":
        return LocalStore(path)
    if kind in ("s3", "s3a"):
        return S3Store(fs, path)
    log.warning(
        "the lease on %s:// is taken without an atomic write: two runs started in the same "
        "instant could both take it",
        kind,
    )
    return PlainStore(fs, path)


class LocalStore:
    """The lease file on a local (or shared POSIX) disk: every change made under an exclusive
    ``flock`` of a lock file beside it (released by the system if its holder dies), the lease
    itself replaced in one rename."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = path.removesuffix(".json") + ".lock"

    def read(self) -> tuple[LeaseRecord, bytes] | None:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        return decode(data), data

    def create(self, data: bytes) -> bytes:
        with self._locked():
            if os.path.exists(self.path):
                raise Taken
            self._write(data)
        return data

    def replace(self, data: bytes, expected: bytes) -> bytes:
        with self._locked():
            current = self.read()
            if current is None or current[1] != expected:
                raise Taken
            self._write(data)
        return data

    def delete(self, expected: bytes) -> None:
        with self._locked():
            current = self.read()
            if current is not None and current[1] == expected:
                os.unlink(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        handle = os.open(self.lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            os.close(handle)  # releases the lock

    def _write(self, data: bytes) -> None:
        folder, name = posixpath.split(self.path)
        staging = os.path.join(folder, f".{name}.{uuid.uuid4().hex}")
        with open(staging, "wb") as handle:
            handle.write(data)
        os.replace(staging, self.path)


class S3Store:
    """The lease object on S3: conditional PUTs on its ETag."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[LeaseRecord, str] | None:
        for _ in range(3):  # the object may be replaced between its head and its body
            self.fs.invalidate_cache(self.path)
            try:
                with self.fs.open(self.path, "rb") as handle:  # reads only the head's version
                    return decode(handle.read()), handle.details["ETag"]
            except FileNotFoundError:
                return None
            except OSError as exc:
                if not _precondition_failed(exc):
                    raise
        raise OSError(f"the lease at {self.path} keeps changing")

    def create(self, data: bytes) -> str:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, expected: str) -> str:
        return self._put(data, IfMatch=expected)

    def delete(self, expected: str) -> None:
        current = self.read()
        if current is not None and current[1] == expected:
            self.fs.rm_file(self.path)

    def _put(self, data: bytes, **condition: str) -> str:
        try:
            response = self.fs.call_s3(
                "put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition
            )
        except Exception as exc:
            if _precondition_failed(exc):
                raise Taken from None
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return response["ETag"]


def _precondition_failed(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc} {getattr(exc, '__cause__', '')}"
    return "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text


class PlainStore:
    """Any other fsspec filesystem: the same protocol, each step a plain read or write."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path

    def read(self) -> tuple[LeaseRecord, bytes] | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return decode(data), data

    def create(self, data: bytes) -> bytes:
        if self.fs.exists(self.path):
            raise Taken
        self.fs.pipe_file(self.path, data)
        return data

    def replace(self, data: bytes, expected: bytes) -> bytes:
        current = self.read()
        if current is None or current[1] != expected:
            raise Taken
        self.fs.pipe_file(self.path, data)
        return data

    def delete(self, expected: bytes) -> None:
        current = self.read()
        if current is not None and current[1] == expected:
            self.fs.rm_file(self.path)
