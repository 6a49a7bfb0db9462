"""How a run shows a person where it stands.

On a terminal (stderr is one), one status line stays at the bottom and is redrawn in place every
second: the stage, its time, and while scoring the traces, model tokens, tokens/s and ETA
(``progress.progress_line``). Everything else the process writes (its log, the workers' lines
that Ray forwards, Ray's own C++ log) goes through a pipe and appears above it. Anywhere else (a
log file, ``ray job submit``) nothing is redrawn: scoring logs a plain progress line every
``compute.progress_s``. Ray-free.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

from ln_ray.pipeline.progress import duration, status_text

CLEAR = "\r\x1b[2K"  # back to the line's start, and erase it
REDRAW_S = 1.0


class RunStatus:
    """The run's status line (live on a terminal, silent elsewhere).

    Args:
        stream: Where it is drawn.
        live: Whether to draw it at all (``stream`` is a terminal).
    """

    def __init__(self, stream: TextIO, live: bool) -> None:
        self.stream = stream
        self.live = live
        self._lock = threading.RLock()
        self._stage: str | None = None
        self._since = time.time()
        self._detail = ""
        self._shown = False
        self._ticker: threading.Thread | None = None

    def stage(self, name: str | None) -> None:
        """The stage the run is in (None: between stages, no line)."""
        with self._lock:
            self._stage, self._since, self._detail = name, time.time(), ""
            self._draw()
        if name is not None and self.live and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def detail(self, text: str) -> None:
        """What the stage says of itself (scoring: its progress line)."""
        with self._lock:
            self._detail = text
            self._draw()

    def progress_output(self, progress_s: float) -> dict[str, Any]:
        """How scoring reports its progress (``report_progress``'s ``interval`` and ``show``):
        into the status line every second when live, else a log line every ``progress_s``."""
        if self.live:
            return {"interval": REDRAW_S, "show": self.detail, "render": status_text}
        return {"interval": progress_s}

    def line(self) -> str:
        """The status line's text (without terminal controls)."""
        if self._stage is None:
            return ""
        elapsed = duration(time.time() - self._since)
        text = f"ln-ray | {self._stage} {elapsed}" + (f" | {self._detail}" if self._detail else "")
        width = shutil.get_terminal_size((120, 24)).columns
        return text if len(text) < width else text[: width - 2] + "…"

    def write_above(self, text: str, stream: TextIO | None = None) -> None:
        """Print ``text`` (whole lines, or a part of one) above the status line."""
        with self._lock:
            out = stream or self.stream
            self._erase()
            out.write(text)
            out.flush()
            if text.endswith("\n"):
                self._draw()

    def close(self) -> None:
        """Erase the line and stop drawing it."""
        with self._lock:
            self._stage = None
            self._erase()

    def _erase(self) -> None:
        if self._shown:
            self.stream.write(CLEAR)
            self.stream.flush()
            self._shown = False

    def _draw(self) -> None:
        if not self.live:
            return
        text = self.line()
        if not text and not self._shown:
            return
        self.stream.write(CLEAR + text)
        self.stream.flush()
        self._shown = bool(text)

    def _tick(self) -> None:
        while True:
            time.sleep(REDRAW_S)
            with self._lock:
                if self._stage is not None:
                    self._draw()


_STATUS: RunStatus | None = None


def run_status() -> RunStatus:
    """This process's status line: live when stderr is a terminal (and ``TERM`` is not
    ``dumb``)."""
    global _STATUS
    if _STATUS is None:
        live = sys.stderr.isatty() and os.environ.get("TERM", "") != "dumb"
        _STATUS = RunStatus(sys.stderr, live)
    return _STATUS


class _Forwarded:
    """What a process writes to one of its file descriptors (a C library's log, Ray's forwarded
    worker lines, Python's streams alike), taken through a pipe and written above the status
    line on the terminal it was bound for."""

    def __init__(self, status: RunStatus, fd: int) -> None:
        self.fd = fd
        self.saved = os.dup(fd)
        self.terminal = os.fdopen(os.dup(fd), "w", encoding="utf-8", errors="replace")
        self._read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        self._status = status
        self._thread = threading.Thread(target=self._forward, daemon=True)
        self._thread.start()

    def _forward(self) -> None:
        with os.fdopen(self._read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                self._status.write_above(chunk.decode("utf-8", "replace"), self.terminal)

    def restore(self) -> None:
        """The descriptor back on its terminal, once all that was written is shown."""
        os.dup2(self.saved, self.fd)  # the pipe's last writer closes: the thread drains it
        os.close(self.saved)
        self._thread.join(timeout=5)
        # A child process that inherited the pipe may still hold it: the thread then goes on
        # forwarding whatever it writes, so its terminal stays open.
        if not self._thread.is_alive():
            self.terminal.close()


@contextlib.contextmanager
def live_display() -> Iterator[RunStatus]:
    """While it lasts, on a terminal: the status line at the bottom, and everything the process
    writes to its stdout and stderr above it."""
    status = run_status()
    if not status.live:
        yield status
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    forwarded = [_Forwarded(status, fd) for fd in (1, 2)]
    drawn_on = status.stream
    status.stream = forwarded[1].terminal
    try:
        yield status
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        status.close()
        for each in forwarded:
            each.restore()
        status.stream = drawn_on
