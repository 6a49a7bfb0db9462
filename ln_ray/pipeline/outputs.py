"""Where a run writes, and how its results become visible: complete, or not at all.

A run writes every output into ``<output.path>/_runs/<run_id>/``. Only when all of them are written
does it publish: ``manifest.json`` is removed first, each output folder replaces the old one, and
the new ``manifest.json`` is written last. Readers treat a folder without ``manifest.json`` as
incomplete (the ``_SUCCESS`` convention); a run killed at any point leaves the previous results, or
no manifest, never a mix presented as finished. Runs that overlap on one output path (a scheduled
refresh, ``ln-ray select``) each stage apart and remove only their own staging area; the last to
publish wins. Staging areas that killed runs left behind are removed once nothing under them has
changed for ``STALE_RUN_S``.
"""

from __future__ import annotations

import contextlib
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ln_ray.io import storage
from ln_ray.io.storage import redact_url

ROWS_DIR = "_rows"  # every input row with its scores, scored or rejected (source of curated/)
RUNS_DIR = "_runs"
CACHE_DIR = "_cache"
MANIFEST = "manifest.json"
SCORE_OUTPUTS = ("scores", "rejects", ROWS_DIR)
REDUCE_OUTPUTS = ("selections", "teachers", "curated")
STALE_RUN_S = 24 * 3600  # an active run writes its staging area far more often than this


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


def publish(paths: RunPaths, names: tuple[str, ...], manifest: dict[str, Any]) -> None:
    """Move the staged outputs into place, then write the manifest last.

    Raises:
        OutputError: A staged output is missing (another process removed this run's staging
            area); the published results are left as they were.
    """
    paths.fs.invalidate_cache()
    missing = [name for name in names if not paths.fs.exists(paths.staged(name))]
    if missing:
        raise OutputError(
            f"run {paths.run_id}: staged outputs {missing} are missing from {paths.staging}"
        )
    manifest_path = paths.final(MANIFEST)
    if paths.fs.exists(manifest_path):
        paths.fs.rm(manifest_path)
    for name in names:
        _remove(paths.fs, paths.final(name))
        _move_folder(paths.fs, paths.staged(name), paths.final(name))
    storage.write_json(storage.full_url(paths.fs, manifest_path), manifest)
    discard(paths)
    _remove_stale_runs(paths)


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
    """Remove this run's staging area (and ``_runs/`` when no other run is staging there)."""
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


def _move_folder(fs: Any, source: str, target: str) -> None:
    if storage.protocol(fs) == "file":
        fs.mv(source, target, recursive=True)  # a rename
        return
    # Object stores have no folders to rename: copy each object, then delete the originals.
    for path in fs.find(source):
        fs.copy(path, storage.join(target, path[len(source) :].lstrip("/")))
    fs.rm(source, recursive=True)


def _remove(fs: Any, path: str) -> None:
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _remove_if_empty(fs: Any, folder: str) -> None:
    # Object stores have no empty folders to remove; a local one may gain a run meanwhile.
    if storage.protocol(fs) == "file" and fs.exists(folder) and not fs.ls(folder):
        with contextlib.suppress(OSError):
            fs.rmdir(folder)


def _remove_stale_runs(paths: RunPaths) -> None:
    """Remove other runs' staging areas where nothing has changed for ``STALE_RUN_S``."""
    runs = storage.join(paths.root, RUNS_DIR)
    if not paths.fs.exists(runs):
        return
    cutoff = time.time() - STALE_RUN_S
    for folder in paths.fs.ls(runs, detail=False):
        if posixpath.basename(folder.rstrip("/")) != paths.run_id and not _changed_since(
            paths.fs, folder, cutoff
        ):
            _remove(paths.fs, folder)
    _remove_if_empty(paths.fs, runs)


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
