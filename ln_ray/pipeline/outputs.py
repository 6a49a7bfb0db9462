"""Where a run writes, and how its results become visible: complete, or not at all.

Every run writes its outputs into its own folder, ``<output.path>/_runs/<run_id>/``, which is
never changed once the run has finished. Publishing copies nothing: the run writes its manifest
into its folder (marking it finished), then replaces ``<output.path>/manifest.json``, the
published pointer, in one atomic write (a rename on a local disk, one PUT on an object store).
The pointer names the run (``run_path``) and where each output lies (``outputs``); every reader
goes through it (``published_manifest``, ``output_url``), so a reader sees one complete run,
never a half-published one, and a run killed at any point leaves the previous results readable.

After publishing, finished runs beyond the newest ``output.keep_runs`` are removed, except those
the pointer names. One run at a time holds the output (``io/lease.py``). Folders that killed runs
left behind are removed once nothing under them has changed for ``STALE_RUN_S``, and those of runs
that failed (their rejects over the budget, kept for diagnosis with a ``failed.json``) after
``FAILED_RUN_S``; never the folder of the run whose lease is alive, however long it has run.
Outputs at the top of ``output.path`` (where they were published before runs kept their own
folders) are removed once the pointer names another place for them.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ln_ray.io import storage
from ln_ray.io.storage import redact_url

log = logging.getLogger(__name__)

FILE_BYTES = 128 * 2**20  # in-memory bytes of rows per written file (Parquet compresses them)
ROWS_DIR = "_rows"  # every input row with its scores, scored or rejected, without its text
VALID_DIR = "_valid"  # every input row after validation, with its text (the one copy of it)
RUNS_DIR = "_runs"
CACHE_DIR = "_cache"
MANIFEST = "manifest.json"
SCORE_OUTPUTS = ("scores", "rejects", ROWS_DIR, VALID_DIR)
REDUCE_OUTPUTS = ("selections", "teachers", "teacher_pairs", "teacher_stability", "curated")
STALE_RUN_S = 24 * 3600  # a killed run's folder, unchanged this long, is removed
FAILED_RUN_S = 7 * 24 * 3600  # a failed run's folder (its rejects, for diagnosis) is kept a week
FAILURE = "failed.json"  # in a failed run's folder: why it failed


class OutputError(RuntimeError):
    """The output location cannot be used."""


@dataclass(frozen=True)
class RunPaths:
    """Paths (inside ``fs``) of one run's output, staging area and score cache."""

    fs: Any
    root: str
    run_id: str

    @classmethod
    def create(cls, output_url: str) -> RunPaths:
        fs, root = storage.filesystem(output_url)
        return cls(fs, root.rstrip("/"), uuid.uuid4().hex[:16])

    @property
    def staging(self) -> str:
        return storage.join(self.root, RUNS_DIR, self.run_id)

    def staged(self, name: str) -> str:
        return storage.join(self.staging, name)

    def final(self, name: str) -> str:
        return storage.join(self.root, name)

    def cache(self, key: str) -> str:
        return storage.full_url(self.fs, storage.join(self.root, CACHE_DIR, key))

    @property
    def root_url(self) -> str:
        return storage.full_url(self.fs, self.root)

    @property
    def arrow_fs(self) -> Any:
        return storage.arrow_filesystem(self.fs)


def check_writable(paths: RunPaths) -> None:
    """Fail fast when the output location cannot be written."""
    try:
        paths.fs.makedirs(paths.staging, exist_ok=True)
        probe = storage.join(paths.staging, ".probe")
        with paths.fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        paths.fs.rm(probe)
    except Exception as exc:
        raise OutputError(f"output.path is not writable: {type(exc).__name__}: {exc}") from None


def publish(
    paths: RunPaths, names: tuple[str, ...], manifest: dict[str, Any], keep_runs: int = 3
) -> dict[str, Any]:
    """Publish the run: its own manifest into its folder, then the pointer, in one write.

    Args:
        paths: The run's paths.
        names: The outputs this run wrote into its folder. Outputs it did not write keep the
            location that ``manifest["outputs"]`` gives them (``ln-ray select`` rewrites the
            reduce outputs only).
        manifest: The run's manifest.
        keep_runs: Finished runs to keep (the published one always stays).

    Returns:
        The manifest as published (with ``run_path`` and ``outputs``).

    Raises:
        OutputError: A staged output is missing (another process removed this run's folder), or
            the pointer could not be written; the published results are left as they were.
    """
    paths.fs.invalidate_cache()
    missing = [name for name in names if not paths.fs.exists(paths.staged(name))]
    if missing:
        raise OutputError(
            f"run {paths.run_id}: staged outputs {missing} are missing from {paths.staging}"
        )
    run_path = posixpath.join(RUNS_DIR, paths.run_id)
    located = {name: posixpath.join(run_path, name) for name in names}
    manifest = {**manifest, "run_path": run_path}
    manifest["outputs"] = {**manifest.get("outputs", {}), **located}
    try:
        storage.write_json(storage.full_url(paths.fs, paths.staged(MANIFEST)), manifest)
        storage.write_json(storage.full_url(paths.fs, paths.final(MANIFEST)), manifest)
    except OSError as exc:
        raise OutputError(
            f"run {paths.run_id} could not be published: {type(exc).__name__}: {exc}"
        ) from None
    try:  # the run is published: what follows only tidies up
        remove_unlisted(paths, keep_runs)
    except Exception as exc:
        log.warning("published run %s; tidying old runs failed: %s", paths.run_id, exc)
    return manifest


def published_manifest(output_url: str) -> dict[str, Any]:
    """The manifest of the run published under ``output_url``.

    Raises:
        OutputError: Nothing has been published there.
    """
    try:
        return storage.read_json(storage.join(output_url, MANIFEST))
    except FileNotFoundError:
        raise OutputError(
            f"no finished run under {redact_url(output_url)!r} (manifest.json is missing)"
        ) from None


def output_url(output_url: str, manifest: dict[str, Any], name: str) -> str:
    """Where the published run's output ``name`` lies (the top of ``output_url`` for a run
    published before runs kept their own folders)."""
    located = manifest.get("outputs", {}).get(name, name)
    return storage.join(output_url, located)


# Outputs added after runs were first published: a run published before them has none.
LATER_OUTPUTS = ("teacher_pairs", "teacher_stability")


def read_published(
    root: str, manifest: dict[str, Any], name: str, columns: list[str] | None = None
) -> Any:
    """Output ``name`` (``columns`` only, default all) of the run published under ``root`` with
    ``manifest``, as a pandas DataFrame; empty for one of ``LATER_OUTPUTS`` the run predates."""
    import pandas as pd
    import pyarrow.parquet as pq

    if name in LATER_OUTPUTS and name not in manifest.get("outputs", {}):
        return pd.DataFrame()
    fs, path = storage.filesystem(output_url(root, manifest, name))
    return pq.read_table(path, columns=columns, filesystem=storage.arrow_filesystem(fs)).to_pandas()


def text_output(manifest: dict[str, Any]) -> str:
    """The output holding the rows' text: ``_valid/``, or ``_rows/`` for a run published before
    the text was kept apart."""
    return VALID_DIR if VALID_DIR in manifest.get("outputs", {}) else ROWS_DIR


def is_finished(fs: Any, run_folder: str) -> bool:
    """Whether a run's folder holds a finished run (its own manifest)."""
    return fs.exists(storage.join(run_folder, MANIFEST))


def write_dataset(
    ds: Any, path: str, arrow_fs: Any, task_args: dict[str, Any] | None = None
) -> None:
    """Write a Ray dataset as Parquet under ``path``, compressed with zstd (which writes text
    about twice as fast as Parquet's default, snappy, into about half the bytes).

    Args:
        ds: The dataset.
        path: The folder.
        arrow_fs: Its filesystem (Arrow).
        task_args: The Ray remote args of the tasks that make ``ds`` (tasks already sized to a
            file's worth of rows): each of them writes its own rows, as one file. Otherwise
            files of about ``FILE_BYTES``: Ray Data writes one file per block, and a run over
            thousands of small shards would write (and every later stage read, task by task)
            thousands of small files; but gathering blocks into files makes the write an
            operator of its own, with tasks of its own.
    """
    sizing = {"min_bytes_per_file": FILE_BYTES} if task_args is None else {}
    ds.write_parquet(
        path,
        filesystem=arrow_fs,
        compression=COMPRESSION,
        ray_remote_args=task_args,
        **sizing,
    )


COMPRESSION = "zstd"


def ensure_table(fs: Any, folder: str, schema: Any) -> None:
    """Give an output that came out empty one empty Parquet file, so readers still see its schema.

    (Ray Data writes no file at all for an empty dataset.)
    """
    import pyarrow.parquet as pq

    if fs.exists(folder) and any(p.endswith(".parquet") for p in fs.find(folder)):
        return
    fs.makedirs(folder, exist_ok=True)
    pq.write_table(
        schema.empty_table(),
        storage.join(folder, "part-0.parquet"),
        filesystem=storage.arrow_filesystem(fs),
    )


def discard(paths: RunPaths) -> None:
    """Remove this run's folder, unless the pointer already names it (and ``_runs/`` when no
    other run is there)."""
    with contextlib.suppress(OutputError):
        pointer = published_manifest(paths.root_url)
        if pointer.get("run_path") == posixpath.join(RUNS_DIR, paths.run_id):
            return
    _remove(paths.fs, paths.staging)
    _remove_if_empty(paths.fs, storage.join(paths.root, RUNS_DIR))


def redacted(config: Any) -> Any:
    """A copy of ``config`` (nested dicts and lists) with every URL's credentials masked."""
    if isinstance(config, dict):
        return {k: redacted(v) for k, v in config.items()}
    if isinstance(config, list):
        return [redacted(v) for v in config]
    if isinstance(config, str):
        return redact_url(config)
    return config


def _remove(fs: Any, path: str) -> None:
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _remove_if_empty(fs: Any, folder: str) -> None:
    # Object stores have no empty folders to remove; a local one may gain a run meanwhile.
    if storage.protocol(fs) == "file" and fs.exists(folder) and not fs.ls(folder):
        with contextlib.suppress(OSError):
            fs.rmdir(folder)


def record_failure(paths: RunPaths, failure: dict[str, Any]) -> None:
    """Mark the run's folder as that of a failed run, with why (it stays, for diagnosis, until
    ``FAILED_RUN_S`` have passed)."""
    storage.write_json(storage.full_url(paths.fs, paths.staged(FAILURE)), redacted(failure))


def remove_unlisted(paths: RunPaths, keep_runs: int, now: float | None = None) -> None:
    """Remove finished runs that are neither among the newest ``keep_runs`` nor named by the
    pointer, the folders of runs killed (or failed) long ago, and outputs published at the top
    of ``output.path`` before runs kept their own folders.

    Args:
        paths: The paths of the run tidying up (its folder stays).
        keep_runs: Finished runs to keep.
        now: The time (seconds since the epoch; default: the clock), against which folders and
            the lease are judged.
    """
    from ln_ray.io.lease import read_lease

    fs = paths.fs
    fs.invalidate_cache()
    now = time.time() if now is None else now
    pointer = storage.read_json(storage.full_url(fs, paths.final(MANIFEST)))
    keep = {paths.run_id} | {
        located.split("/")[1] for located in pointer.get("outputs", {}).values()
    }
    lease = read_lease(paths.root_url)
    if lease is not None and not lease.stale(now):
        keep.add(lease.run_id)  # a live run, however long it has run
    runs = storage.join(paths.root, RUNS_DIR)
    finished = []
    for folder in fs.ls(runs, detail=False) if fs.exists(runs) else []:
        if is_finished(fs, folder):
            finished.append((_finished_at(fs, folder), _run_id(folder), folder))
            continue
        failed = fs.exists(storage.join(folder, FAILURE))
        cutoff = now - (FAILED_RUN_S if failed else STALE_RUN_S)
        if _run_id(folder) not in keep and not _changed_since(fs, folder, cutoff):
            _remove(fs, folder)
    finished.sort(reverse=True)
    keep |= {run_id for _, run_id, _ in finished[:keep_runs]}
    for _, run_id, folder in finished:
        if run_id not in keep:
            _remove(fs, folder)
    located = pointer.get("outputs", {})
    for name in (*SCORE_OUTPUTS, *REDUCE_OUTPUTS):
        if name in located:  # read from a run's folder now, not from the top
            _remove(fs, paths.final(name))


def _run_id(folder: str) -> str:
    return posixpath.basename(folder.rstrip("/"))


def _finished_at(fs: Any, folder: str) -> str:
    """When a finished run finished (ISO text, sorts in time order)."""
    try:
        own = storage.read_json(storage.full_url(fs, storage.join(folder, MANIFEST)))
        return str(own["finished_at"])
    except (OSError, KeyError, ValueError):
        return ""


def _changed_since(fs: Any, folder: str, cutoff: float) -> bool:
    """Whether anything under ``folder`` changed after ``cutoff``; True when that is unknown."""
    known = False
    for path in [folder, *fs.find(folder, withdirs=True)]:
        try:
            changed = fs.modified(path).timestamp()
        except (OSError, NotImplementedError, KeyError, ValueError):
            continue
        if changed > cutoff:
            return True
        known = True
    return not known
