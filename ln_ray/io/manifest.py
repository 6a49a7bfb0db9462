"""What a published run records, typed: the run's manifest and the pointer to it.

Every run writes ``manifest.json`` into its own folder when it finishes; publishing writes the
same document to ``<output.path>/manifest.json``, the pointer (``io/run_folder.py``). Both are a
``RunManifest``; the pointer's part that says where things lie is a ``Pointer``. Every layout an
earlier ln-ray published is read here, and only here:

- layout 1: the outputs at the top of ``output.path`` (no ``run_path``, no ``outputs``), the
  rows' text in ``_rows/``, no ``teacher_pairs/`` or ``teacher_stability/``;
- layout 2: a folder per run (``run_path``), each output located in ``outputs``;
- layout 3: layout 2 with its number recorded (``layout``).
"""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass, field
from typing import Any

from ln_ray.io import storage

LAYOUT = 3

MANIFEST = "manifest.json"
RUNS_DIR = "_runs"
CACHE_DIR = "_cache"
ROWS_DIR = "_rows"  # every input row with its scores, scored or rejected, without its text
VALID_DIR = "_valid"  # every input row after validation, with its text (the one copy of it)
NEW_DIR = "_new"  # the rows whose trace the score cache did not hold: to score, or repeats
LATE_DIR = "_late"  # the traces the scoring actors rejected, with the reason
SCORE_OUTPUTS = ("scores", "rejects", ROWS_DIR, VALID_DIR)
REDUCE_OUTPUTS = ("selections", "teachers", "teacher_pairs", "teacher_stability", "curated")
# Outputs added after runs were first published: a run published before them has none.
LATER_OUTPUTS = ("teacher_pairs", "teacher_stability")


@dataclass
class RunManifest:
    """One finished run: what it read, how it scored, what it wrote and where.

    The nested records (config, counts, stages...) are the JSON objects ``docs/OUTPUTS.md``
    describes; ``outputs`` maps each output the run's readers use to its folder, relative to
    ``output.path``.
    """

    run_id: str
    started_at: str = ""
    finished_at: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] = field(default_factory=dict)  # model, identity, proof
    scoring_version: int | None = None
    score_cache: str = ""
    inputs: list[dict[str, Any]] = field(default_factory=list)  # per input file
    skipped_files: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    reject_kinds: dict[str, int] = field(default_factory=dict)
    lease: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    run_path: str | None = None  # the run's folder, once published
    outputs: dict[str, str] = field(default_factory=dict)
    layout: int = LAYOUT
    extra: dict[str, Any] = field(default_factory=dict)  # keys a later ln-ray wrote, kept

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RunManifest:
        """A manifest as any layout wrote it."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "layout"}
        values = {key: value for key, value in doc.items() if key in known}
        extra = {key: value for key, value in doc.items() if key not in known | {"layout"}}
        layout = doc.get("layout") or (2 if doc.get("run_path") else 1)
        return cls(**values, layout=layout, extra=extra)

    def to_json(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if doc["run_path"] is None:
            del doc["run_path"]
        return {**self.extra, **doc}

    def located(self, name: str) -> str:
        """Where output ``name`` lies, relative to ``output.path`` (at the top in layout 1)."""
        return self.outputs.get(name, name)

    def has(self, name: str) -> bool:
        """Whether the run wrote output ``name`` (every output but ``LATER_OUTPUTS`` and
        ``_valid/`` exists in layout 1)."""
        return name in self.outputs or (
            self.layout == 1 and name not in (*LATER_OUTPUTS, VALID_DIR)
        )

    @property
    def text_output(self) -> str:
        """The output holding the rows' text: ``_valid/``, or ``_rows/`` before the text was kept
        apart."""
        return VALID_DIR if VALID_DIR in self.outputs else ROWS_DIR

    def redacted(self) -> RunManifest:
        """The manifest with every URL's credentials masked (``storage.redacted``)."""
        return RunManifest.from_json(storage.redacted(self.to_json()))

    def replace(self, **changes: Any) -> RunManifest:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Pointer:
    """What the published pointer says about where things lie."""

    run_id: str
    run_path: str | None
    outputs: dict[str, str]

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Pointer:
        return cls(doc.get("run_id", ""), doc.get("run_path"), dict(doc.get("outputs", {})))

    def runs(self) -> set[str]:
        """The ids of the runs whose folders hold a published output."""
        return {
            located.split("/")[1]
            for located in self.outputs.values()
            if located.startswith(RUNS_DIR + "/")
        }

    def names(self, run_id: str) -> bool:
        """Whether the pointer names run ``run_id`` as the published run."""
        return self.run_path == posixpath.join(RUNS_DIR, run_id)
