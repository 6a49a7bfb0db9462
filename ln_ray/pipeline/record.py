"""The job's passes, declared once, and the record each run keeps of them.

Each ``Pass`` names what it reads and writes, with their schemas, and the resources its tasks
and actors reserve. A ``Timeline`` times every pass as it runs, checks that the datasets it wrote
have the declared schema, and keeps what the pass reports of itself; the run's manifest
(``io/manifest.RunManifest``) is assembled from those records (``run_manifest``).
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

import ln_ray
from ln_ray.config import ComputeConfig, LnRayConfig, to_dict
from ln_ray.io.folder import Folder
from ln_ray.io.manifest import LATE_DIR, NEW_DIR, ROWS_DIR, VALID_DIR, RunManifest
from ln_ray.pipeline.display import run_status
from ln_ray.schema import (
    CACHE_SCHEMA,
    NEW_ROWS_SCHEMA,
    PREPARED_SCHEMA,
    RAW_SCHEMA,
    REJECTS_SCHEMA,
    ROW_META_SCHEMA,
    SCORED_ROWS_SCHEMA,
    SCORES_SCHEMA,
    SCORING_REJECTS_SCHEMA,
    SELECTIONS_SCHEMA,
    TEACHER_PAIRS_SCHEMA,
    TEACHER_STABILITY_SCHEMA,
    TEACHERS_SCHEMA,
    VALIDATED_SCHEMA,
)
from ln_ray.score.version import SCORING_VERSION

if TYPE_CHECKING:
    from ln_ray.io.lease import Lease
    from ln_ray.score.student import VettedStudent


@dataclass(frozen=True)
class Pass:
    """One pass of the job over the data.

    Attributes:
        name: Its name in the manifest's ``stages``.
        reads: What it reads, with the schema of a row.
        writes: The datasets it writes into the run's folder, with their schemas (checked when
            the pass ends); None for a dataset whose columns depend on the input (``curated/``).
        resources: What each of its tasks and actors reserves, from the compute settings (Ray
            Data's default, one CPU a task, where it names none).
    """

    name: str
    reads: dict[str, pa.Schema]
    writes: dict[str, pa.Schema | None] = field(default_factory=dict)
    resources: Callable[[ComputeConfig], dict[str, float]] = lambda compute: {}


VALIDATE = Pass(
    "read_validate",
    reads={"input files": RAW_SCHEMA},
    writes={VALID_DIR: VALIDATED_SCHEMA},
    resources=lambda compute: {"task_cpus": compute.prepare_cpus},
)
LOOKUP = Pass(
    "lookup_cache",
    reads={VALID_DIR: ROW_META_SCHEMA, "score cache": CACHE_SCHEMA},
    writes={NEW_DIR: NEW_ROWS_SCHEMA},
)
SCORE = Pass(
    "tokenize_score",
    reads={VALID_DIR: VALIDATED_SCHEMA, NEW_DIR: NEW_ROWS_SCHEMA, "tokenized": PREPARED_SCHEMA},
    # Scores go into the score cache (CACHE_SCHEMA), batch by batch, not the run's folder.
    writes={LATE_DIR: SCORING_REJECTS_SCHEMA},
    resources=lambda compute: {
        "task_cpus": compute.prepare_cpus,
        "actors": compute.actors,
        "cpus_per_actor": compute.cpus_per_actor,
        "gpus_per_actor": compute.gpus_per_actor,
    },
)
COMPACT = Pass("compact_cache", reads={"score cache": CACHE_SCHEMA})
ASSEMBLE = Pass(
    "assemble",
    reads={
        VALID_DIR: ROW_META_SCHEMA,
        "score cache": CACHE_SCHEMA,
        LATE_DIR: SCORING_REJECTS_SCHEMA,
    },
    writes={ROWS_DIR: SCORED_ROWS_SCHEMA, "scores": SCORES_SCHEMA, "rejects": REJECTS_SCHEMA},
)
REDUCE = Pass(
    "reduce",
    reads={"scores": SCORES_SCHEMA, ROWS_DIR: SCORED_ROWS_SCHEMA, VALID_DIR: VALIDATED_SCHEMA},
    writes={
        "selections": SELECTIONS_SCHEMA,
        "teachers": TEACHERS_SCHEMA,
        "teacher_pairs": TEACHER_PAIRS_SCHEMA,
        "teacher_stability": TEACHER_STABILITY_SCHEMA,
        "curated": None,
    },
)
PASSES = (VALIDATE, LOOKUP, SCORE, COMPACT, ASSEMBLE, REDUCE)


class Timeline:
    """The record of a run's passes: seconds, resources and what each reported.

    Args:
        compute: The run's compute settings (each pass's resources come from them).
        folder: The run's folder, where the passes' outputs are checked.
    """

    def __init__(self, compute: ComputeConfig, folder: Folder) -> None:
        self.compute = compute
        self.folder = folder
        self.stages: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def run(self, step: Pass) -> Iterator[dict[str, Any]]:
        """Time ``step``; the dict it yields takes what the pass reports of itself."""
        started = time.time()
        figures: dict[str, Any] = {}
        status = run_status()
        status.stage(step.name)
        try:
            yield figures
        finally:
            status.stage(None)
        check_written(self.folder, step)
        figures.update(
            seconds=round(time.time() - started, 3), resources=step.resources(self.compute)
        )
        self.stages[step.name] = figures  # the pass may add figures known only later

    def seconds(self, *names: str) -> float:
        return round(sum(self.stages.get(name, {}).get("seconds", 0.0) for name in names), 3)


def check_written(folder: Folder, step: Pass) -> None:
    """Every dataset ``step`` writes has the columns and types it declares (read from one
    file's footer).

    Raises:
        TypeError: A dataset differs from its declaration.
    """
    for name, schema in step.writes.items():
        files = folder.parquet_files(name) if schema is not None else []
        if not files:
            continue
        found = pq.read_schema(folder.full(files[0]), filesystem=folder.arrow_fs)
        if not found.remove_metadata().equals(schema.remove_metadata()):
            raise TypeError(
                f"{step.name} wrote {name}/ with columns {found.names} and types "
                f"{[str(t) for t in found.types]}, not the declared {schema}"
            )


def run_manifest(
    cfg: LnRayConfig,
    run_id: str,
    started: float,
    student: VettedStudent,
    proofs: list[dict[str, Any]],
    lease: Lease,
    timeline: Timeline,
    **recorded: Any,
) -> RunManifest:
    """The manifest of a scoring run, from its records.

    Args:
        cfg: The run's config.
        run_id: The run.
        started: When it started (seconds since the epoch).
        student: The vetted student.
        proofs: Each scoring actor's self-check.
        lease: The output's lease the run held.
        timeline: Its passes.
        **recorded: The manifest's other fields (``RunManifest``): the score cache, inputs,
            skipped files, counts, rejects by reason and kind, selection.
    """
    stages = timeline.stages
    score_s = max(timeline.seconds(VALIDATE.name, LOOKUP.name, SCORE.name), 1e-9)
    scored = stages.get(SCORE.name, {})
    finished = time.time()
    return RunManifest(
        run_id=run_id,
        started_at=iso(started),
        finished_at=iso(finished),
        config=to_dict(cfg),
        student={
            "model": cfg.student.model,
            "identity": student.identity,
            "proof": proof_entry(student, proofs),
        },
        scoring_version=SCORING_VERSION,
        lease=lease_entry(lease),
        stages=stages,
        timings={
            "score_s": score_s,
            "reduce_s": timeline.seconds(REDUCE.name),
            "total_s": round(finished - started, 3),
        },
        throughput={  # over the traces scored by this run (not those from the cache)
            "tokens_per_s": round(scored.get("tokens_scored_now", 0) / score_s, 1),
            "model_tokens_per_s": round(scored.get("model_tokens_now", 0) / score_s, 1),
        },
        versions=versions(),
        **recorded,
    ).redacted()  # any URL in it may carry credentials


def proof_entry(student: VettedStudent, proofs: list[dict[str, Any]]) -> dict[str, Any]:
    """How the student was proven: covered by the tests, and every scoring actor's self-check
    (the worst of them); none when nothing was new to score."""
    entry: dict[str, Any] = {
        "model_type": student.model_type,
        "covered_by_tests": student.covered_by_tests,
        "proven_by": "tests and self-check" if student.covered_by_tests else "self-check",
    }
    if proofs:
        worst = max(proofs, key=lambda proof: proof["max_difference"])
        entry["self_check"] = {**worst, "actors": len(proofs)}
    else:
        entry["self_check"] = None  # no actor started: every trace came from the cache
        entry["proven_by"] = "tests" if student.covered_by_tests else "earlier runs' self-check"
    return entry


def lease_entry(lease: Lease) -> dict[str, Any]:
    entry: dict[str, Any] = {"timeout_s": lease.timeout_s}
    if lease.broken is not None:
        entry["broke"] = {
            "run_id": lease.broken.run_id,
            "owner": lease.broken.owner,
            "last_heartbeat": iso(lease.broken.heartbeat),
        }
    return entry


def versions() -> dict[str, str]:
    import ray
    import torch
    import transformers

    return {
        "ln_ray": ln_ray.__version__,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pa.__version__,
    }


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")
