"""The two streaming passes over the input, as Ray Data plans.

1. ``validate_rows``: every row is read and validated (CPU tasks; no tokenizer, no student) and
   written once to the run's ``_valid/``. Then ``lookup.find_new_rows`` finds, bucket by bucket
   of the score cache, the rows whose trace the cache does not hold (the run's ``_new/``).
2. ``score_new_rows``: only those rows are read back, tokenized (CPU tasks) and scored by an
   actor pool that grows with the work, into the score cache; the traces it rejects go to the
   run's ``_late/``, and only counts come back. A trace that several new rows hold is scored
   once (its first copy; the others repeat it). A run with nothing new never starts it, so a
   refresh over a scored corpus loads no student.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ln_ray.config import LnRayConfig
from ln_ray.io import storage
from ln_ray.io.cache import ScoreCache
from ln_ray.io.datasource import TraceShardDatasource, plan_pieces
from ln_ray.io.manifest import VALID_DIR
from ln_ray.io.run_folder import RunFolder
from ln_ray.io.storage import Inputs
from ln_ray.pipeline.display import run_status
from ln_ray.pipeline.lookup import NewRows, to_score
from ln_ray.pipeline.progress import ProgressCounter, ProgressReport, progress_line, report_progress
from ln_ray.pipeline.ray_ops import (
    await_free_cpus,
    cluster_cpus,
    collect,
    read_valid,
    reduce_partitions,
    task_retries,
    write_dataset,
)
from ln_ray.pipeline.score_stage import SCORE_COUNTS, ScoreStage
from ln_ray.pipeline.stages import TOKENIZE_INPUT, PlanLimits, tokenize_batch, validate_batch
from ln_ray.schema import (
    REJECTS_SCHEMA,
    ROW_KEY,
    ROW_META_SCHEMA,
    VALIDATED_SCHEMA,
    reason_kinds,
    row_keys,
)

if TYPE_CHECKING:
    from ln_ray.score.student import VettedStudent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Validated:
    """What validation found: rows read, rows accepted, rows rejected by kind."""

    rows: int
    accepted: int
    rejected: dict[str, int]
    reasons: dict[str, int] = field(default_factory=dict)  # rejected rows per ``reason_kinds``


def validate_rows(cfg: LnRayConfig, inputs: Inputs, run: RunFolder) -> Validated:
    """Read every shard and validate each row; write them to the run's ``_valid/``.

    Args:
        cfg: The run's config.
        inputs: The input files.
        run: The run's folder.

    Returns:
        The rows read, accepted, and rejected (by kind).
    """
    import ray

    # Ray Data runs reading, validating and writing as one task only when no read task's
    # output is split by Ray Data itself; a read task left waiting on its consumer while holding
    # a CPU could leave none for the write (a 2-CPU machine hangs). Small shards are grouped, a
    # few to a task, a large one is cut into pieces (``input.split_bytes``), and each task
    # writes its rows as one file.
    task = {"num_cpus": cfg.compute.prepare_cpus, **task_retries(cfg.compute)}
    arrow_fs = storage.arrow_filesystem(inputs.fs)
    paths = [path for path, _ in inputs.files]
    sizes = [info.size or 0 for info in arrow_fs.get_file_info(paths)]
    pieces = plan_pieces(
        [(path, fmt, size) for (path, fmt), size in zip(inputs.files, sizes)],
        arrow_fs,
        cfg.input.split_bytes,
        task,
    )
    datasource = TraceShardDatasource(
        pieces,
        {path: inputs.shown(path) for path in paths},
        cfg.input.columns,
        arrow_fs,
        inputs.path_fields(cfg.input.teacher_from_path),
        cfg.input.layout,
    )
    validated = ray.data.read_datasource(
        datasource,
        override_num_blocks=read_tasks(len(pieces), datasource.estimate_inmemory_data_size()),
        ray_remote_args=task,
    ).map_batches(
        validate_batch,
        fn_kwargs={
            "segment": cfg.segment,
            "scoring": cfg.scoring,
            "student": cfg.student,
        },
        batch_format="pyarrow",
        batch_size=None,  # whole read blocks (of BLOCK_ROWS): a batch size would stop the fusion
        **task,
    )
    write_dataset(validated, run, VALID_DIR, task_args=task)
    run.ensure_table(VALID_DIR, VALIDATED_SCHEMA)
    counts = collect(
        read_valid(
            run, columns=["reject_reason", "reject_kind"], blocks=reduce_partitions()
        ).map_batches(_count_rows, batch_format="pyarrow"),
        _ROW_COUNTS,
    ).to_pandas()
    accepted = counts[counts["kind"] == "ok"]["rows"].sum()
    rejected = counts[counts["kind"] != "ok"].groupby("kind")["rows"].sum()
    reasons = counts.dropna(subset=["reason"]).groupby("reason")["rows"].sum()
    return Validated(
        rows=int(counts["rows"].sum()),
        accepted=int(accepted),
        rejected={str(kind): int(n) for kind, n in rejected.items()},
        reasons={str(reason): int(n) for reason, n in reasons.items()},
    )


def write_validation_rejects(run: RunFolder) -> None:
    """The rows validation rejected, as the run's ``rejects/`` (for a run that fails before
    scoring)."""
    rejected = read_valid(run, columns=ROW_META_SCHEMA.names, blocks=reduce_partitions())
    write_dataset(
        rejected.map_batches(rejects_of, batch_format="pyarrow"), run, "rejects", task_args={}
    )
    run.ensure_table("rejects", REJECTS_SCHEMA)


def read_tasks(pieces: int, input_bytes: int | None) -> int:
    """Read tasks for the validation pass: about ``TASK_BYTES`` of input each, at least two per
    CPU of the cluster, at most one per piece (a whole file, or a part of a large one)."""
    by_size = math.ceil((input_bytes or 0) / TASK_BYTES)
    return max(1, min(pieces, max(2 * cluster_cpus(), by_size)))


TASK_BYTES = 64 * 2**20  # under Ray Data's block target (128 MB), so no read is split


def rejects_of(rows: pa.Table) -> pa.Table:
    """The rejected ones of ``rows`` (with provenance, ids and reject reason and kind), as
    ``rejects/`` holds them."""
    rejected = rows.filter(pc.is_valid(rows["reject_reason"]))
    columns = [*ROW_KEY, "prompt_id", "teacher", "reject_reason", "reject_kind"]
    return rejected.select(columns).rename_columns(REJECTS_SCHEMA.names).cast(REJECTS_SCHEMA)


_ROW_COUNTS = pa.schema([("kind", pa.string()), ("reason", pa.string()), ("rows", pa.int64())])


def _count_rows(table: pa.Table) -> pa.Table:
    """A block's rows by what happens to them: ``ok`` (accepted), or the kind and reason
    (``reason_kinds``) of their reject."""
    kind = pc.coalesce(table["reject_kind"], pa.scalar("ok", pa.string()))
    reason = reason_kinds(table["reject_reason"])
    counted = (
        pa.table({"kind": kind, "reason": reason})
        .group_by(["kind", "reason"], use_threads=False)
        .aggregate([("kind", "count")])
    )  # columns by name: their order differs between pyarrow releases
    return pa.table(
        {"kind": counted["kind"], "reason": counted["reason"], "rows": counted["kind_count"]},
        schema=_ROW_COUNTS,
    )


class ScoringHalted(RuntimeError):
    """A scoring actor stopped the job before scoring (its student failed its checks)."""


@dataclass
class ScoringPass:
    """What the scoring pass hands back besides the scores it put in the cache.

    Attributes:
        rejected: The traces it could not tokenize or score (in the run's ``_late/``, with
            reason and kind: ``SCORING_REJECTS_SCHEMA``).
        kernels: The attention kernels the actors ran.
        proofs: How each actor proved its student (``score/proof.Proof.to_dict``).
        merged: The cache's parts merged while it scored (``ScoreCache.merging``).
    """

    rejected: int
    kernels: list[str]
    proofs: list[dict[str, Any]]
    merged: dict[str, int] = field(default_factory=dict)


def score_new_rows(
    cfg: LnRayConfig, run: RunFolder, cache: ScoreCache, new: NewRows, student: VettedStudent
) -> ScoringPass:
    """Tokenize and score the rows the lookup found new (``_new/``), into the score cache.

    The actor pool starts with one actor and grows to ``compute.actors`` while there is work
    for more (never past one actor per batch of new rows). Each actor loads the student,
    checks that it has the identity the driver computed (``student``) and proves it before its
    first batch. Progress is shown as the run's status on a terminal (``display.py``), else
    logged every ``compute.progress_s``.

    Raises:
        ScoringHalted: An actor stopped the job: the reason says why.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    compute = cfg.compute
    new_rows = new.to_score
    actors = max(1, min(compute.actors, math.ceil(new_rows / compute.batch_traces)))
    # On the driver's node: a worker node lost while scoring (a preempted spot node) must not
    # take the run's progress, halts and proofs with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    free = ray.available_resources().get("CPU", 0.0)
    counter = ray.remote(num_cpus=0, scheduling_strategy=here)(ProgressCounter).remote()
    done, started = threading.Event(), time.time()
    status = run_status()
    reporter = threading.Thread(
        target=report_progress,
        args=(counter, new_rows, started, done),
        kwargs=status.progress_output(compute.progress_s),
        daemon=True,
    )
    reporter.start()
    merging = cache.merging(cfg.output.merge_parts, compute.progress_s)
    try:
        with merging as merged:
            rejected = _tokenize_and_score(
                cfg, run, cache, actors, student, ProgressReport(counter)
            )
    except Exception:
        halted = ray.get(counter.halt_reason.remote())
        if halted is not None:
            raise ScoringHalted(halted) from None
        raise
    finally:
        done.set()
        reporter.join()
    progress = ray.get(counter.snapshot.remote())
    kernels = ray.get(counter.attention.remote())
    proofs = ray.get(counter.proven.remote())
    log.info(progress_line(progress, new_rows, time.time() - started))
    ray.kill(counter)
    await_free_cpus(free)
    return ScoringPass(rejected, kernels, proofs, merged)


def _tokenize_and_score(
    cfg: LnRayConfig,
    run: RunFolder,
    cache: ScoreCache,
    actors: int,
    student: VettedStudent,
    progress: ProgressReport,
) -> int:
    """Tokenize and score ``_new/``'s rows to score; returns how many traces were rejected."""
    import ray

    compute = cfg.compute
    # Reading (a task per file of _valid/), filtering and tokenizing run as one task beside the
    # actors. Ray Data's Parquet reader would split large files into read tasks of their own,
    # and a read task waiting on a busy pool while holding a CPU could leave none for the tasks
    # that would let it go on (a 2-CPU machine hangs).
    task = {"num_cpus": compute.prepare_cpus, **task_retries(compute)}
    files = run.parquet_files(VALID_DIR)
    counts = (
        ray.data.from_items(
            [{"name": name} for name in files], override_num_blocks=max(1, len(files))
        )
        .map_batches(
            _new_rows, fn_kwargs={"run": run}, batch_format="pyarrow", batch_size=1, **task
        )
        .map_batches(
            tokenize_batch,
            fn_kwargs={
                "student": cfg.student,
                "segment": cfg.segment,
                "scoring": cfg.scoring,
                "limits": PlanLimits(student.global_cap, student.rope_limit),
                "progress": progress,
            },
            batch_format="pyarrow",
            batch_size=64,
            **task,
        )
        .map_batches(
            ScoreStage,
            fn_constructor_kwargs={
                "student": cfg.student,
                "scoring": cfg.scoring,
                "compute": compute,
                "cache": cache,
                "run": run,
                "identity": student.identity,
                "progress": progress,
            },
            batch_format="pyarrow",
            batch_size=compute.batch_traces,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
            num_cpus=compute.cpus_per_actor,
            num_gpus=compute.gpus_per_actor,
            # A dead actor is restarted and its batch retried this many times, not forever.
            max_restarts=compute.max_retries,
            max_task_retries=compute.max_retries,
        )
    )
    # The actors write their scores and rejects themselves and hand on a row of counts per
    # batch, so the driver takes those directly: no write task needs a CPU while the pool holds
    # its own.
    return int(pc.sum(collect(counts, SCORE_COUNTS)["rejected"]).as_py() or 0)


def _new_rows(files: pa.Table, run: RunFolder) -> Iterator[pa.Table]:
    """The rows of the named ``_valid/`` files that the lookup chose to score, streamed."""
    for name in files["name"].to_pylist():
        chosen = to_score(run, name)
        if not len(chosen):
            continue
        with run.open(name, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            for batch in parquet.iter_batches(batch_size=256, columns=TOKENIZE_INPUT.names):
                table = pa.Table.from_batches([batch]).cast(TOKENIZE_INPUT)
                new = table.filter(pc.is_in(row_keys(table), value_set=chosen))
                if new.num_rows:
                    yield new
