"""The Ray Data job, in the order of its data flow:

    passes.validate_rows    read, validate, look up the score cache        (every row, CPU)
    passes.score_new_rows   tokenize and score the new traces only          (CPU tasks, actors)
    compact.compact_cache   fold the score cache's parts into its buckets
    assemble.assemble_rows  every row with its scores: _rows/, scores/, rejects/
    accounting              rows read = scored + rejected, per input file
    reduce.reduce_scores    selections/, teachers/, curated/
    outputs.publish         the manifest, last

``run_score`` is the whole job; ``run_select`` re-runs only the reduce stage over a finished run.
Everything a run writes is staged and published at the end (``outputs.py``); scores persist in the
score cache as they are computed (``io/cache.py``), so a re-run after an interruption, or a
scheduled refresh over a grown corpus, tokenizes and scores only traces it has not scored before.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pandas as pd

import ln_ray
from ln_ray.config import ComputeConfig, LnRayConfig, to_dict
from ln_ray.io import cache, storage
from ln_ray.io.lease import Lease, LeaseHeld
from ln_ray.pipeline import outputs
from ln_ray.pipeline.accounting import (
    COUNTS,
    AccountingError,
    RejectBudgetError,
    check_inputs,
    check_reject_budget,
    count_rows,
    counted,
    start_counting,
)
from ln_ray.pipeline.assemble import assemble_rows
from ln_ray.pipeline.compact import compact_cache
from ln_ray.pipeline.outputs import (
    REDUCE_OUTPUTS,
    ROWS_DIR,
    SCORE_OUTPUTS,
    VALID_DIR,
    RunPaths,
    text_output,
)
from ln_ray.pipeline.passes import (
    ScoringHalted,
    ScoringPass,
    Validated,
    score_new_rows,
    validate_rows,
    write_validation_rejects,
)
from ln_ray.pipeline.reduce import cluster_cpus, reduce_scores
from ln_ray.schema import LATE_REJECTS_SCHEMA
from ln_ray.score.version import SCORING_VERSION

if TYPE_CHECKING:  # the student module loads torch, which only a scoring run needs
    from ln_ray.score.student import VettedStudent

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The run cannot start or finish; the message says why."""


def connect_ray(compute: ComputeConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (as ``ray job submit`` sets), else start local Ray;
    then set this driver's Ray Data options (its tasks inherit them)."""
    import ray
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # "local": a new Ray of its own, never a cluster that `ray start` left on this node
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    # The reduce stage's groupbys move small tables; a sort shuffle runs them as plain tasks,
    # where the hash shuffle first starts aggregator actors (seconds each on a small cluster).
    context = DataContext.get_current()
    context.shuffle_strategy = (
        ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        if compute.shuffle == "sort"
        else ShuffleStrategy.SHUFFLE_V2
    )
    # The job reads back its own staged Parquet several times. Ray Data's V2 Parquet reader plans
    # each read as a file-listing task before its read tasks, a task's start-up at every read;
    # the V1 reader lists in the driver. RAY_DATA_USE_DATASOURCE_V2 overrides.
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        context.use_datasource_v2 = False
    # Ray Data splits every read into at least 200 blocks; the job's reads of its own staged
    # Parquet would then run as hundreds of tiny tasks. Blocks of the default size (128 MB), and
    # at least two per CPU, keep every CPU busy with a fraction of the tasks.
    context.read_op_min_num_blocks = 2 * cluster_cpus()


def run_score(cfg: LnRayConfig) -> dict[str, Any]:
    """Run the whole job and publish every output under ``output.path``.

    Args:
        cfg: A validated config.

    Returns:
        The manifest (also written, last, to ``output.path/manifest.json``).

    Raises:
        JobError: A problem with the whole run (found before any scoring starts: the input, the
            output or its lease, the student), a student that fails its self-check, rows that
            went missing between reading and writing, or more rejects than
            ``output.max_reject_fraction`` allows. The published results stay as they were.
    """

    from ln_ray.score.student import check_student
    from ln_ray.score.vetting import StudentError

    started = time.time()
    try:
        files, skipped = storage.list_input_files(cfg.input.path, cfg.input.format)
        storage.check_output_apart(cfg.input.path, cfg.output.path)
        student = check_student(
            cfg.student,
            want_gpu=cfg.compute.gpus_per_actor > 0,
            max_tokens=cfg.scoring.max_tokens,
            view=cfg.scoring.render,
        )
        paths = RunPaths.create(cfg.output.path)
        lease = _take_lease(cfg, paths, "score")
    except (storage.InputError, StudentError, outputs.OutputError) as exc:
        raise JobError(storage.redact_url(str(exc))) from None
    try:
        return _score(cfg, files, skipped, student, paths, lease, started)
    finally:
        lease.release()


def _take_lease(cfg: LnRayConfig, paths: RunPaths, command: str) -> Lease:
    """The output's lease for this run, and a writable output, checked before any work."""
    lease = Lease(paths.root_url, paths.run_id, command, cfg.output.lease_timeout_s)
    try:
        lease.acquire()
    except LeaseHeld as exc:
        raise outputs.OutputError(str(exc)) from None
    except OSError as exc:
        raise outputs.OutputError(
            f"output.path is not writable: {type(exc).__name__}: {exc}"
        ) from None
    try:
        outputs.check_writable(paths)
    except outputs.OutputError:
        lease.release()
        raise
    lease.start_heartbeat()
    return lease


def _score(
    cfg: LnRayConfig,
    files: list[tuple[str, str]],
    skipped: list[str],
    student: VettedStudent,
    paths: RunPaths,
    lease: Lease,
    started: float,
) -> dict[str, Any]:
    """``run_score`` once the run holds the output's lease."""
    connect_ray(cfg.compute)
    identity = student.identity
    cache_url = paths.cache(cache.cache_key(identity, cfg.scoring))
    cached = cache.cached_trace_ids(cache_url)
    log.info(
        "run %s: %d input files, student %s (%s), %d traces already in the score cache",
        paths.run_id,
        len(files),
        identity,
        "covered by the equivalence tests"
        if student.covered_by_tests
        else f"model type {student.model_type}: proven by its self-check alone",
        len(cached),
    )
    in_fs, _ = storage.filesystem(cfg.input.path)
    urls = {path: storage.full_url(in_fs, path) for path, _ in files}  # to open files
    shown = {path: storage.redact_url(url) for path, url in urls.items()}  # to record or show
    # Rows per file, counted independently of the pipeline (and in parallel with it).
    expected_rows = start_counting([(urls[path], fmt) for path, fmt in files])
    keep_folder = False  # a failed run's folder stays when its rejects explain the failure
    try:
        validated = validate_rows(cfg, files, shown, in_fs, paths, cached)
        validated_at = time.time()
        _check_early_rejects(cfg, paths, validated)
        new_rows = validated.new
        log.info("%d rows to tokenize and score (the rest are cached or rejected)", new_rows)
        scoring = ScoringPass(LATE_REJECTS_SCHEMA.empty_table(), [], [])
        if new_rows:
            scoring = score_new_rows(cfg, paths, cache_url, new_rows, identity)
        scored_at = time.time()
        compaction = _compact(cache_url, cfg.output.cache_buckets)
        compacted_at = time.time()
        folded = "error" not in compaction  # else parts are left, perhaps a trace twice
        if folded:  # one row per trace, counted from the files' footers
            scored_now = cache.stored_rows(cache_url) - len(cached)
        else:
            scored_now = len(cache.cached_trace_ids(cache_url)) - len(cached)
        log.info(
            "scored %d new traces in %.1fs; assembling outputs", scored_now, scored_at - started
        )
        rows, duplicates = assemble_rows(
            paths, cache_url, scoring.rejects, cfg.output.cache_buckets if folded else None
        )
        counted_rows = count_rows(rows, cached)
        inputs = check_inputs(files, shown, counted_rows.per_file, counted(expected_rows))
        counts = {key: sum(entry[key] for entry in inputs) for key in COUNTS}
        keep_folder = True
        check_reject_budget(counts["rows_read"], counted_rows.kinds, cfg.output.max_reject_fraction)
        keep_folder = False
        assembled_at = time.time()
        log.info("selecting per prompt and ranking teachers")
        selection = reduce_scores(
            paths.fs,
            paths.staged("scores"),
            paths.staged(ROWS_DIR),
            paths.staged(VALID_DIR),
            paths.staging,
            cfg.selection,
        )
        lease.check()
    except RejectBudgetError as exc:
        raise _failed(paths, f"{exc}{_rejects_hint(paths)}", started) from None
    except ScoringHalted as exc:
        outputs.discard(paths)
        raise JobError(storage.redact_url(str(exc))) from None
    except (AccountingError, LeaseHeld) as exc:
        if not keep_folder:
            outputs.discard(paths)
        raise JobError(str(exc)) from None
    except BaseException:
        if not keep_folder:
            outputs.discard(paths)
        raise
    counts["traces_scored_now"] = scored_now
    score_s = max(scored_at - started, 1e-9)
    new_tokens = sum(entry["tokens_scored_now"] for entry in inputs)
    new_model_tokens = sum(entry["model_tokens_now"] for entry in inputs)
    manifest = {
        "run_id": paths.run_id,
        "started_at": _iso(started),
        "finished_at": _iso(time.time()),
        "config": to_dict(cfg),
        "student": {
            "model": cfg.student.model,
            "identity": identity,
            "proof": _proof(student, scoring.proofs),
        },
        "scoring_version": SCORING_VERSION,
        "score_cache": cache_url,
        "inputs": inputs,
        "skipped_files": [storage.full_url(in_fs, path) for path in skipped],
        "counts": counts,
        "reject_reasons": counted_rows.reasons,
        "reject_kinds": counted_rows.kinds,
        "lease": _lease_entry(lease),
        "selection": {k: v for k, v in selection.items() if k != "reduce_s"},
        "stages": {
            "read_validate": {
                "seconds": round(validated_at - started, 3),
                "rows": counts["rows_read"],
                "shard_errors": sum(entry["shard_errors"] for entry in inputs),
            },
            "tokenize_score": {
                "seconds": round(scored_at - validated_at, 3),
                "rows": new_rows,
                "traces_scored_now": scored_now,
                "tokens_scored_now": new_tokens,
                "model_tokens_now": new_model_tokens,
                "attention": scoring.kernels,  # the kernel each scoring actor ran, and its dtype
            },
            "assemble": {
                "seconds": round(assembled_at - compacted_at, 3),
                "rows_scored": counts["rows_scored"],
                "rows_rejected": counts["rows_rejected"],
                "duplicates": duplicates,
            },
            "reduce": {"seconds": selection["reduce_s"], "prompts": selection["prompts"]},
            "compact_cache": compaction,
        },
        "timings": {
            "score_s": round(score_s, 3),
            "reduce_s": selection["reduce_s"],
            "total_s": round(time.time() - started, 3),
        },
        "throughput": {  # over the traces scored by this run (not those from the cache)
            "tokens_per_s": round(new_tokens / score_s, 1),
            "model_tokens_per_s": round(new_model_tokens / score_s, 1),
        },
        "versions": _versions(),
    }
    manifest = outputs.redacted(manifest)  # any URL in it may carry credentials
    manifest = _publish(paths, (*SCORE_OUTPUTS, *REDUCE_OUTPUTS), manifest, cfg.output.keep_runs)
    log.info("published run %s to %s", paths.run_id, storage.redact_url(cfg.output.path))
    return manifest


def _check_early_rejects(cfg: LnRayConfig, paths: RunPaths, validated: Validated) -> None:
    """Fail before scoring when validation alone rejected more than the budget allows (writing
    those rejects into the run's folder, for diagnosis)."""
    try:
        check_reject_budget(validated.rows, validated.rejected, cfg.output.max_reject_fraction)
    except RejectBudgetError as exc:
        write_validation_rejects(paths)
        raise RejectBudgetError(f"before scoring: {exc}") from None


def _failed(paths: RunPaths, error: str, started: float) -> JobError:
    """Record why the run failed in its folder (kept for diagnosis); the error to raise."""
    outputs.record_failure(
        paths, {"run_id": paths.run_id, "error": error, "started_at": _iso(started)}
    )
    return JobError(storage.redact_url(f"run {paths.run_id} did not publish: {error}"))


def _rejects_hint(paths: RunPaths) -> str:
    where = storage.redact_url(storage.full_url(paths.fs, paths.staged("rejects")))
    return (
        f". The published results are unchanged; this run's rejects are in {where}. Raise "
        "output.max_reject_fraction if they are expected."
    )


def _proof(student: VettedStudent, proofs: list[dict[str, Any]]) -> dict[str, Any]:
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


def _lease_entry(lease: Lease) -> dict[str, Any]:
    entry: dict[str, Any] = {"timeout_s": lease.timeout_s}
    if lease.broken is not None:
        entry["broke"] = {
            "run_id": lease.broken.run_id,
            "owner": lease.broken.owner,
            "last_heartbeat": _iso(lease.broken.heartbeat),
        }
    return entry


def run_select(cfg: LnRayConfig) -> dict[str, Any]:
    """Re-run selections, teacher table and curated set over a finished run's scores.

    The new reduce outputs go into a run folder of their own; the published scores stay where
    they are, and the new manifest names both. It holds the output's lease while it runs.

    Returns:
        The updated manifest.
    """
    manifest = read_manifest(cfg.output.path)
    paths = RunPaths.create(cfg.output.path)
    try:
        lease = _take_lease(cfg, paths, "select")
    except outputs.OutputError as exc:
        raise JobError(storage.redact_url(str(exc))) from None
    try:
        connect_ray(cfg.compute)
        manifest = read_manifest(cfg.output.path)  # the run published last, now that it is ours
        try:
            selection = reduce_scores(
                paths.fs,
                _located(paths, manifest, "scores"),
                _located(paths, manifest, ROWS_DIR),
                _located(paths, manifest, text_output(manifest)),
                paths.staging,
                cfg.selection,
            )
            lease.check()
        except LeaseHeld as exc:
            outputs.discard(paths)
            raise JobError(str(exc)) from None
        except BaseException:
            outputs.discard(paths)
            raise
        manifest["run_id"] = paths.run_id
        manifest["selection"] = {k: v for k, v in selection.items() if k != "reduce_s"}
        manifest["config"]["selection"] = to_dict(cfg)["selection"]
        manifest["timings"]["reduce_s"] = selection["reduce_s"]
        manifest.setdefault("stages", {})["reduce"] = {
            "seconds": selection["reduce_s"],
            "prompts": selection["prompts"],
        }
        manifest["finished_at"] = _iso(time.time())
        manifest = outputs.redacted(manifest)
        return _publish(paths, REDUCE_OUTPUTS, manifest, cfg.output.keep_runs)
    finally:
        lease.release()


def read_manifest(output_path: str) -> dict[str, Any]:
    """The manifest of the run published under ``output_path``.

    Raises:
        JobError: Nothing has been published there.
    """
    try:
        return outputs.published_manifest(output_path)
    except outputs.OutputError as exc:
        raise JobError(str(exc)) from None


def read_teacher_table(
    output_path: str, name: str = "teachers", manifest: dict[str, Any] | None = None
) -> pd.DataFrame:
    """The teacher table of the run published under ``output_path`` (or ``teacher_pairs``,
    ``teacher_stability``: empty for a run published before they existed); ``manifest``: its
    manifest, when the caller has read it already."""
    return outputs.read_published(output_path, manifest or read_manifest(output_path), name)


def _compact(cache_url: str, buckets: int) -> dict[str, Any]:
    """Fold the score cache's parts into its buckets; a failure costs only file count (the next
    run folds what is left), so it is logged and the run goes on."""
    try:
        return compact_cache(cache_url, buckets)
    except Exception as exc:
        log.warning("the score cache was not compacted (the next run will): %s", exc)
        return {"error": f"{type(exc).__name__}: {exc}"}


def _located(paths: RunPaths, manifest: dict[str, Any], name: str) -> str:
    """The published output ``name``, as a path inside ``paths.fs``."""
    return storage.filesystem(outputs.output_url(paths.root_url, manifest, name))[1]


def _publish(
    paths: RunPaths, names: tuple[str, ...], manifest: dict[str, Any], keep_runs: int
) -> dict[str, Any]:
    """Publish the run; when that fails, remove its folder and say why."""
    try:
        return outputs.publish(paths, names, manifest, keep_runs)
    except outputs.OutputError as exc:
        outputs.discard(paths)
        raise JobError(storage.redact_url(str(exc))) from None
    except BaseException:
        outputs.discard(paths)
        raise


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch
    import transformers

    return {
        "ln_ray": ln_ray.__version__,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pyarrow.__version__,
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")
