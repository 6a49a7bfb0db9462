"""Where a run writes, and how its results become visible: complete, or not at all.

An ``OutputRoot`` is an ``output.path``; each run writes into a ``RunFolder`` of its own,
``<output.path>/_runs/<run_id>/``, never changed once the run has finished. Publishing copies
nothing: the run writes its manifest into its folder (marking it finished), then replaces
``<output.path>/manifest.json``, the published pointer, in one atomic write (a rename on a local
disk, one PUT on an object store). The pointer names the run (``run_path``) and where each output
lies (``outputs``); every reader goes through it (``PublishedRun.open``), so a reader sees one
complete run, never a half-published one, and a run killed at any point leaves the previous
results readable.

After publishing, finished runs beyond the newest ``output.keep_runs`` are removed, except those
the pointer names. One run at a time holds the output (``io/lease.py``). Folders that killed runs
left behind are removed once nothing under them has changed for ``STALE_RUN_S``, and those of runs
that failed (their rejects over the budget, kept for diagnosis with a ``failed.json``) after
``FAILED_RUN_S``; never the folder of the run whose lease is alive, however long it has run.
Outputs at the top of ``output.path`` (layout 1, ``io/manifest.py``) are removed once the pointer
names another place for them.

Every object here is a ``Folder`` (``io/folder.py``): it pickles into Ray tasks as it is.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import time
import uuid
from typing import Any

from ln_ray.io import storage
from ln_ray.io.cache import ScoreCache
from ln_ray.io.folder import Folder
from ln_ray.io.lease import Lease, read_lease
from ln_ray.io.manifest import (
    CACHE_DIR,
    LATER_OUTPUTS,
    MANIFEST,
    REDUCE_OUTPUTS,
    RUNS_DIR,
    SCORE_OUTPUTS,
    Pointer,
    RunManifest,
)

log = logging.getLogger(__name__)

STALE_RUN_S = 24 * 3600  # a killed run's folder, unchanged this long, is removed
FAILED_RUN_S = 7 * 24 * 3600  # a failed run's folder (its rejects, for diagnosis) is kept a week
FAILURE = "failed.json"  # in a failed run's folder: why it failed


class OutputError(RuntimeError):
    """The output location cannot be used."""


class OutputRoot(Folder):
    """An ``output.path``: the published pointer, the runs' folders, the score caches and the
    lease."""

    def new_run(self) -> RunFolder:
        """The folder of a new run (created when it first writes)."""
        return RunFolder(self.url, uuid.uuid4().hex[:16])

    def cache(self, key: str) -> ScoreCache:
        """The score cache for one cache key (``cache.cache_key``)."""
        return ScoreCache(self.url_of(CACHE_DIR, key))

    def lease(self, run_id: str, command: str, timeout_s: float) -> Lease:
        return Lease(self.url, run_id, command, timeout_s)

    def pointer_doc(self) -> dict[str, Any]:
        """The published pointer as written.

        Raises:
            OutputError: Nothing has been published here.
        """
        try:
            return self.read_json(MANIFEST)
        except FileNotFoundError:
            raise OutputError(
                f"no finished run under {storage.redact_url(self.url)!r} (manifest.json is missing)"
            ) from None

    def remove_unlisted(self, keeping: str, keep_runs: int, now: float | None = None) -> None:
        """Remove finished runs that are neither among the newest ``keep_runs`` nor named by the
        pointer, the folders of runs killed (or failed) long ago, and outputs published at the
        top of ``output.path`` in layout 1.

        Args:
            keeping: The run tidying up (its folder stays).
            keep_runs: Finished runs to keep.
            now: The time (seconds since the epoch; default: the clock), against which folders
                and the lease are judged.
        """
        self.fs.invalidate_cache()
        now = time.time() if now is None else now
        pointer = Pointer.from_json(self.pointer_doc())
        keep = {keeping} | pointer.runs()
        lease = read_lease(self.url)
        if lease is not None and not lease.stale(now):
            keep.add(lease.run_id)  # a live run, however long it has run
        finished = []
        for name in self.ls(RUNS_DIR, detail=False) if self.exists(RUNS_DIR) else []:
            run_id = posixpath.basename(name.rstrip("/"))
            if self.exists(posixpath.join(name, MANIFEST)):
                finished.append((self._finished_at(name), run_id, name))
                continue
            failed = self.exists(posixpath.join(name, FAILURE))
            cutoff = now - (FAILED_RUN_S if failed else STALE_RUN_S)
            if run_id not in keep and not self._changed_since(name, cutoff):
                self.remove(name)
        finished.sort(reverse=True)
        keep |= {run_id for _, run_id, _ in finished[:keep_runs]}
        for _, run_id, name in finished:
            if run_id not in keep:
                self.remove(name)
        for name in (*SCORE_OUTPUTS, *REDUCE_OUTPUTS):
            if name in pointer.outputs:  # read from a run's folder now, not from the top
                self.remove(name)

    def _finished_at(self, run: str) -> str:
        """When a finished run finished (ISO text, sorts in time order)."""
        try:
            return str(self.read_json(posixpath.join(run, MANIFEST))["finished_at"])
        except (OSError, KeyError, ValueError):
            return ""

    def _changed_since(self, name: str, cutoff: float) -> bool:
        """Whether anything under ``name`` changed after ``cutoff``; True when that is
        unknown."""
        known = False
        for path in [name, *self.find(name, withdirs=True)]:
            try:
                changed = self.modified(path).timestamp()
            except (OSError, NotImplementedError, KeyError, ValueError):
                continue
            if changed > cutoff:
                return True
            known = True
        return not known


class RunFolder(Folder):
    """One run's folder, ``<output.path>/_runs/<run_id>/``.

    Args:
        root_url: The ``output.path``.
        run_id: The run.
    """

    def __init__(self, root_url: str, run_id: str) -> None:
        super().__init__(storage.join(root_url, RUNS_DIR, run_id))
        self.root = OutputRoot(root_url)
        self.run_id = run_id

    @property
    def run_path(self) -> str:
        """The folder, relative to ``output.path`` (as the manifest records it)."""
        return posixpath.join(RUNS_DIR, self.run_id)

    def check_writable(self) -> None:
        """Fail fast when the output location cannot be written."""
        try:
            self.makedirs("", exist_ok=True)
            with self.open(".probe", "wb") as handle:
                handle.write(b"ok")
            self.rm(".probe")
        except Exception as exc:
            raise OutputError(f"output.path is not writable: {type(exc).__name__}: {exc}") from None

    def publish(
        self, names: tuple[str, ...], manifest: RunManifest, keep_runs: int = 3
    ) -> RunManifest:
        """Publish the run: its own manifest into its folder, then the pointer, in one write.

        Args:
            names: The outputs this run wrote into its folder. Outputs it did not write keep the
                location that ``manifest.outputs`` gives them (``ln-ray select`` rewrites the
                reduce outputs only).
            manifest: The run's manifest.
            keep_runs: Finished runs to keep (the published one always stays).

        Returns:
            The manifest as published (with ``run_path`` and ``outputs``).

        Raises:
            OutputError: A staged output is missing (another process removed this run's folder),
                or the pointer could not be written; the published results are left as they
                were.
        """
        self.fs.invalidate_cache()
        missing = [name for name in names if not self.exists(name)]
        if missing:
            raise OutputError(
                f"run {self.run_id}: staged outputs {missing} are missing from "
                f"{storage.redact_url(self.url)}"
            )
        located = {name: posixpath.join(self.run_path, name) for name in names}
        manifest = manifest.replace(run_path=self.run_path, outputs={**manifest.outputs, **located})
        doc = manifest.to_json()
        try:
            self.write_json(MANIFEST, doc)
            self.root.write_json(MANIFEST, doc)
        except OSError as exc:
            raise OutputError(
                f"run {self.run_id} could not be published: {type(exc).__name__}: {exc}"
            ) from None
        try:  # the run is published: what follows only tidies up
            self.root.remove_unlisted(self.run_id, keep_runs)
        except Exception as exc:
            log.warning("published run %s; tidying old runs failed: %s", self.run_id, exc)
        return manifest

    def discard(self) -> None:
        """Remove this run's folder, unless the pointer already names it (and ``_runs/`` when no
        other run is there)."""
        with contextlib.suppress(OutputError):
            if Pointer.from_json(self.root.pointer_doc()).names(self.run_id):
                return
        self.remove()
        runs = self.root
        # Object stores have no empty folders to remove; a local one may gain a run meanwhile.
        if runs.protocol_name == "file" and runs.exists(RUNS_DIR) and not runs.ls(RUNS_DIR):
            with contextlib.suppress(OSError):
                runs.rmdir(RUNS_DIR)

    def record_failure(self, failure: dict[str, Any]) -> None:
        """Mark the folder as that of a failed run, with why (it stays, for diagnosis, until
        ``FAILED_RUN_S`` have passed)."""
        self.write_json(FAILURE, storage.redacted(failure))


class PublishedRun:
    """The run published under an ``output.path``, read through its pointer.

    ``open`` reads the pointer once; ``table`` and ``full`` find each output where the pointer
    says it lies, in any layout (``io/manifest.py``).
    """

    def __init__(self, root: OutputRoot, manifest: RunManifest) -> None:
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, output_url: str) -> PublishedRun:
        """The run published under ``output_url``.

        Raises:
            OutputError: Nothing has been published there.
        """
        root = OutputRoot(output_url)
        return cls(root, RunManifest.from_json(root.pointer_doc()))

    @property
    def arrow_fs(self) -> Any:
        return self.root.arrow_fs

    def full(self, name: str) -> str:
        """Where output ``name`` lies, as a path inside the filesystem (for Ray Data)."""
        return self.root.full(self.manifest.located(name))

    def url(self, name: str) -> str:
        return self.root.url_of(self.manifest.located(name))

    def batches(self, name: str, columns: list[str], batch_rows: int, schema: Any = None) -> Any:
        """Output ``name`` streamed in record batches (``Folder.batches``)."""
        return self.root.batches(self.manifest.located(name), columns, batch_rows, schema)

    def table(self, name: str, columns: list[str] | None = None, filters: Any = None) -> Any:
        """Output ``name`` (``columns`` only, default all; the rows that pass ``filters``, in
        pyarrow's form) as a pandas DataFrame; empty for one of ``LATER_OUTPUTS`` that the run
        predates."""
        import pandas as pd

        if name in LATER_OUTPUTS and not self.manifest.has(name):
            return pd.DataFrame()
        located = self.manifest.located(name)
        return self.root.read_table(located, columns=columns, filters=filters).to_pandas()
