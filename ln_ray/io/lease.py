"""One run at a time per output: a lease object at ``<output.path>/_lease.json``.

A run (``ln-ray score``, ``ln-ray select``, the nightly refresh) takes the lease before it writes
anything and gives it back when it ends. The lease names its holder (run id, host and process,
when it started) and carries a heartbeat that a thread renews every ``timeout / 5`` seconds.

- Taking it is atomic: on S3 a conditional PUT (``If-None-Match: *``), on a local disk a check
  and write under an exclusive lock (``flock``, which the system releases if its holder dies). A
  second run stops at once with an error naming the holder.
- A lease whose heartbeat is older than its holder's timeout (``output.lease_timeout_s``, which
  the lease records) belongs to a run that died: the next run breaks it, atomically (on S3 a PUT
  conditional on the stale lease's ETag, locally a compare and write under the lock), and says
  so.
- Renewing is conditional on the lease still being the one this run wrote; a run that finds it
  broken or replaced has lost it and must not publish (``check``).

Filesystems other than local and S3 get the same protocol without the atomic writes (a warning
says so).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from ln_ray.io import storage

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"


class LeaseHeld(RuntimeError):
    """Another live run holds the output's lease (or this run lost it)."""


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
            f"run {self.run_id} ({self.command}, {self.owner}, started {_iso(self.started)}, "
            f"last heartbeat {now - self.heartbeat:.0f}s ago)"
        )


class _Taken(Exception):
    """A conditional write lost its race."""


class Lease:
    """The lease of one output path, for one run.

    Args:
        output_url: The run's ``output.path``.
        run_id: The run taking it.
        command: What the run is (``score``, ``select``), as others are told.
        timeout_s: How long without a heartbeat before others may break it.
        clock: Seconds since the epoch (``time.time``; tests pass their own).
    """

    def __init__(
        self,
        output_url: str,
        run_id: str,
        command: str,
        timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        fs, root = storage.filesystem(output_url)
        self._store = _store_for(fs, storage.join(root.rstrip("/"), LEASE_FILE))
        self.run_id = run_id
        self.command = command
        self.timeout_s = timeout_s
        self.clock = clock
        self.broken: LeaseRecord | None = None  # the dead run's lease this run broke, if any
        self._token: Any = None
        self._record: LeaseRecord | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease, breaking a stale one.

        Raises:
            LeaseHeld: A live run holds it.
        """
        now = self.clock()
        record = LeaseRecord(
            run_id=self.run_id,
            owner=f"{socket.gethostname()}:{os.getpid()}",
            command=self.command,
            started=now,
            heartbeat=now,
            timeout_s=self.timeout_s,
        )
        for _ in range(3):  # each round either takes it or finds a live holder
            try:
                self._token = self._store.create(_encode(record))
                self._record = record
                return
            except _Taken:
                pass
            current = self._store.read()
            if current is None:
                continue  # released meanwhile
            held, token = current
            if not held.stale(now):
                raise LeaseHeld(
                    f"output.path is in use by {held.describe(now)}: one run at a time per "
                    f"output; if that run died, its lease can be broken "
                    f"{max(0.0, held.heartbeat + held.timeout_s - now):.0f}s from now"
                )
            try:
                self._token = self._store.replace(_encode(record), token)
            except _Taken:
                continue  # another run broke it first, or its holder renewed it
            self._record, self.broken = record, held
            log.warning(
                "broke the lease of %s: no heartbeat for %.0fs (its timeout %.0fs)",
                held.describe(now),
                now - held.heartbeat,
                held.timeout_s,
            )
            return
        raise LeaseHeld("output.path's lease keeps changing hands: another run is starting")

    def renew(self) -> None:
        """Write a new heartbeat, if the lease is still this run's; else mark it lost."""
        if self._record is None or self._lost is not None:
            return
        record = LeaseRecord(**{**asdict(self._record), "heartbeat": self.clock()})
        try:
            self._token = self._store.replace(_encode(record), self._token)
            self._record = record
        except _Taken:
            current = self._store.read()
            holder = current[0].describe(self.clock()) if current else "nobody"
            self._lost = f"this run lost the lease of output.path (now held by {holder})"
            log.error(self._lost)

    def check(self) -> None:
        """Raise when this run no longer holds the lease (it must not publish).

        Raises:
            LeaseHeld: The lease was broken or replaced.
        """
        if self._lost is None and self._record is not None:
            missed = self.clock() - self._record.heartbeat
            if missed > self.timeout_s:
                self._lost = f"this run missed its heartbeat for {missed:.0f}s"
        if self._lost is not None:
            raise LeaseHeld(self._lost)

    def release(self) -> None:
        """Give the lease back (only if it is still this run's)."""
        self.stop_heartbeat()
        if self._record is not None and self._lost is None:
            self._store.delete(self._token)
        self._record = None

    def start_heartbeat(self) -> None:
        """Renew the lease every ``timeout / 5`` seconds in a thread, until released."""
        interval = max(0.05, self.timeout_s / 5)

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    self.renew()
                except Exception as exc:  # a missed beat is retried; check() sees a long gap
                    log.warning("lease heartbeat failed (retried): %s", exc)

        self._thread = threading.Thread(target=beat, name="ln-ray-lease", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Lease:
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_lease(output_url: str) -> LeaseRecord | None:
    """The lease at ``output_url`` (live or stale), if any."""
    fs, root = storage.filesystem(output_url)
    current = _store_for(fs, storage.join(root.rstrip("/"), LEASE_FILE)).read()
    return current[0] if current else None


def _encode(record: LeaseRecord) -> bytes:
    return json.dumps(asdict(record), sort_keys=True).encode()


def _decode(data: bytes) -> LeaseRecord:
    return LeaseRecord(**json.loads(data))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def _store_for(fs: Any, path: str) -> Any:
    kind = storage.protocol(fs)
    if kind == "file":
        return _LocalStore(path)
    if kind in ("s3", "s3a"):
        return _S3Store(fs, path)
    log.warning(
        "the lease on %s:// is taken without an atomic write: two runs started in the same "
        "instant could both take it",
        kind,
    )
    return _PlainStore(fs, path)


class _LocalStore:
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
        return _decode(data), data

    def create(self, data: bytes) -> bytes:
        with self._locked():
            if os.path.exists(self.path):
                raise _Taken
            self._write(data)
        return data

    def replace(self, data: bytes, expected: bytes) -> bytes:
        with self._locked():
            current = self.read()
            if current is None or current[1] != expected:
                raise _Taken
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


class _S3Store:
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
                    return _decode(handle.read()), handle.details["ETag"]
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
                raise _Taken from None
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return response["ETag"]


def _precondition_failed(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc} {getattr(exc, '__cause__', '')}"
    return "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text


class _PlainStore:
    """Any other fsspec filesystem: the same protocol, each step a plain read or write."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path

    def read(self) -> tuple[LeaseRecord, bytes] | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return _decode(data), data

    def create(self, data: bytes) -> bytes:
        if self.fs.exists(self.path):
            raise _Taken
        self.fs.pipe_file(self.path, data)
        return data

    def replace(self, data: bytes, expected: bytes) -> bytes:
        current = self.read()
        if current is None or current[1] != expected:
            raise _Taken
        self.fs.pipe_file(self.path, data)
        return data

    def delete(self, expected: bytes) -> None:
        current = self.read()
        if current is not None and current[1] == expected:
            self.fs.rm_file(self.path)
