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
says so). How each filesystem takes and replaces the object is in ``io/lease_store.py``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from ln_ray.io import storage
from ln_ray.io.lease_store import LeaseRecord, Taken, encode, store_for

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"


class LeaseHeld(RuntimeError):
    """Another live run holds the output's lease (or this run lost it)."""


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
        self._store = store_for(fs, storage.join(root.rstrip("/"), LEASE_FILE))
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
                self._token = self._store.create(encode(record))
                self._record = record
                return
            except Taken:
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
                self._token = self._store.replace(encode(record), token)
            except Taken:
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
            self._token = self._store.replace(encode(record), self._token)
            self._record = record
        except Taken:
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
    current = store_for(fs, storage.join(root.rstrip("/"), LEASE_FILE)).read()
    return current[0] if current else None
