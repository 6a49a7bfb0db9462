"""The Ray Data job, as a recipe in the order of its data flow:

    preflight               config, input files, student, output folder and its lease
    passes.validate_rows    read and validate                               (every row, CPU)
    lookup.find_new_rows    the rows whose trace the score cache lacks      (bucket by bucket)
    passes.score_new_rows   tokenize and score the new traces only          (CPU tasks, actors)
    ScoreCache.compact      fold the score cache's parts into its buckets
    assemble.assemble_rows  every row with its scores: _rows/, scores/, rejects/
    accounting              rows read = scored + rejected, per input file
    reduce.reduce_scores    selections/, teachers/, curated/
    RunFolder.publish       the manifest, last

``run_score`` is the whole job; ``run_select`` re-runs only the reduce stage over a finished run.
Each pass is declared in ``record.py`` (what it reads and writes, its resources) and timed there;
the manifest is assembled from those records. Everything a run writes goes into its own folder
and is published at the end (``io/run_folder.py``); scores persist in the score cache as they are
computed (``io/cache.py``), so a re-run after an interruption, or a scheduled refresh over a grown
corpus, tokenizes and scores only traces it has not scored before.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ln_ray.config import LnRayConfig, to_dict
from ln_ray.io import storage
from ln_ray.io.cache import ScoreCache, cache_key
from ln_ray.io.lease import Lease, LeaseHeld
from ln_ray.io.manifest import REDUCE_OUTPUTS, SCORE_OUTPUTS, VALID_DIR, RunManifest
from ln_ray.io.run_folder import OutputError, OutputRoot, PublishedRun, RunFolder
from ln_ray.io.storage import Inputs
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
from ln_ray.pipeline.lookup import find_new_rows, new_row_keys
from ln_ray.pipeline.passes import (
    ScoringHalted,
    ScoringPass,
    Validated,
    score_new_rows,
    validate_rows,
    write_validation_rejects,
)
from ln_ray.pipeline.ray_ops import ClusterTooSmall, connect_ray, reduce_partitions
from ln_ray.pipeline.record import (
    ASSEMBLE,
    COMPACT,
    LOOKUP,
    REDUCE,
    SCORE,
    VALIDATE,
    Timeline,
    iso,
    run_manifest,
)
from ln_ray.pipeline.reduce import reduce_scores

if TYPE_CHECKING:  # the student module loads torch, which only a scoring run needs
    from ln_ray.score.student import VettedStudent

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The run cannot start or finish; the message says why."""


def run_score(cfg: LnRayConfig) -> RunManifest:
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
    try:  # preflight: nothing is read or scored before the run can finish
        inputs = Inputs.list(cfg.input.path, cfg.input.format)
        inputs.path_fields(cfg.input.teacher_from_path)  # every file names its teacher
        storage.check_output_apart(cfg.input.path, cfg.output.path)
        student = check_student(
            cfg.student,
            want_gpu=cfg.compute.gpus_per_actor > 0,
            max_tokens=cfg.scoring.max_tokens,
            view=cfg.scoring.render,
        )
        run = OutputRoot(cfg.output.path).new_run()
        lease = _take_lease(cfg, run, "score")
    except (storage.InputError, StudentError, OutputError) as exc:
        raise JobError(storage.redact_url(str(exc))) from None
    try:
        manifest = _score(cfg, inputs, student, run, lease, started)
        return _publish(run, (*SCORE_OUTPUTS, *REDUCE_OUTPUTS), manifest, cfg.output.keep_runs)
    finally:
        lease.release()


def _score(
    cfg: LnRayConfig,
    inputs: Inputs,
    student: VettedStudent,
    run: RunFolder,
    lease: Lease,
    started: float,
) -> RunManifest:
    """The passes of ``run_score``, once the run holds the output's lease; its manifest."""
    cache = run.root.cache(cache_key(student.identity, cfg.scoring))
    buckets = cfg.output.cache_buckets
    log.info(
        "run %s: %d input files, student %s (%s)",
        run.run_id,
        len(inputs.files),
        student.identity,
        "covered by the equivalence tests"
        if student.covered_by_tests
        else f"model type {student.model_type}: proven by its self-check alone",
    )
    timeline = Timeline(cfg.compute, run)
    with _unpublished(run, started):
        connect_ray(cfg.compute)  # and wait for the cluster this run was configured for
        expected_rows = start_counting(inputs)  # rows per file, counted apart from the pipeline
        with timeline.run(VALIDATE) as record:
            validated = validate_rows(cfg, inputs, run)
            record.update(rows=validated.rows)
        _check_early_rejects(cfg, run, validated)
        with timeline.run(LOOKUP) as record:
            # Parts left by an interrupted run are folded first: the lookup reads buckets.
            leftover = _compact(cache, buckets) if cache.unfolded(buckets) else {}
            cached_before = _cached_traces(cache, "error" not in leftover)
            new = find_new_rows(run, cache, buckets)
            cached_rows = validated.accepted - new.to_score - new.repeats
            record.update(rows=validated.accepted, to_score=new.to_score, repeats=new.repeats)
            record.update(cached=cached_rows, **({"folded_first": leftover} if leftover else {}))
        log.info(
            "%d traces in the score cache; %d rows to score (%d more repeat them, %d cached)",
            *(cached_before, new.to_score, new.repeats, cached_rows),
        )
        with timeline.run(SCORE) as scored:
            scoring = ScoringPass(0, [], [])
            if new.to_score:
                scoring = score_new_rows(cfg, run, cache, new, student)
            scored.update(rows=new.to_score, rejected=scoring.rejected, attention=scoring.kernels)
            scored.update(scoring.merged)
        with timeline.run(COMPACT) as compaction:
            compaction.update(_compact(cache, buckets))
        folded = "error" not in compaction  # else parts are left, perhaps a trace twice
        scored_now = _cached_traces(cache, folded) - cached_before
        log.info(
            "scored %d new traces in %.1fs; assembling outputs", scored_now, time.time() - started
        )
        with timeline.run(ASSEMBLE) as record:
            rows, duplicates = assemble_rows(run, cache, buckets if folded else None)
            counted_rows = count_rows(rows, new_row_keys(run) if new.to_score else None)
            entries = check_inputs(inputs, counted_rows.per_file, counted(expected_rows))
            counts = {key: sum(entry[key] for entry in entries) for key in COUNTS}
            check_reject_budget(
                counts["rows_read"],
                counted_rows.kinds,
                cfg.output.max_reject_fraction,
                counted_rows.reasons,
            )
            record.update(
                rows_scored=counts["rows_scored"],
                rows_rejected=counts["rows_rejected"],
                duplicates=duplicates,
            )
        scored.update(
            traces_scored_now=scored_now,
            tokens_scored_now=sum(entry["tokens_scored_now"] for entry in entries),
            model_tokens_now=sum(entry["model_tokens_now"] for entry in entries),
        )
        timeline.stages[VALIDATE.name]["shard_errors"] = sum(e["shard_errors"] for e in entries)
        log.info("selecting per prompt and ranking teachers")
        with timeline.run(REDUCE) as record:
            selection = reduce_scores(run, VALID_DIR, run, cfg.selection, cfg.output)
            record.update(prompts=selection["prompts"])
        lease.check()
    return run_manifest(
        cfg,
        run.run_id,
        started,
        student,
        scoring.proofs,
        lease,
        timeline,
        score_cache=cache.url,
        inputs=entries,
        skipped_files=[inputs.url(path) for path in inputs.skipped],
        counts={**counts, "traces_scored_now": scored_now},
        reject_reasons=counted_rows.reasons,
        reject_kinds=counted_rows.kinds,
        selection={k: v for k, v in selection.items() if k != "reduce_s"},
    )


@contextlib.contextmanager
def _unpublished(run: RunFolder, started: float) -> Iterator[None]:
    """What becomes of the run's folder when a pass fails: kept, with why, when its rejects
    explain the failure (over the reject budget); removed otherwise. Either way the published
    results stay as they were."""
    try:
        yield
    except RejectBudgetError as exc:
        where = storage.redact_url(run.url_of("rejects"))
        error = (
            f"{exc}. The published results are unchanged; this run's rejects are in {where}. "
            "Raise output.max_reject_fraction if they are expected."
        )
        run.record_failure({"run_id": run.run_id, "error": error, "started_at": iso(started)})
        raise JobError(storage.redact_url(f"run {run.run_id} did not publish: {error}")) from None
    except (ClusterTooSmall, ScoringHalted, AccountingError, LeaseHeld) as exc:
        run.discard()
        raise JobError(storage.redact_url(str(exc))) from None
    except BaseException:
        run.discard()
        raise


def _check_early_rejects(cfg: LnRayConfig, run: RunFolder, validated: Validated) -> None:
    """Fail before scoring when validation alone rejected more than the budget allows (writing
    those rejects into the run's folder, for diagnosis)."""
    try:
        check_reject_budget(
            validated.rows, validated.rejected, cfg.output.max_reject_fraction, validated.reasons
        )
    except RejectBudgetError as exc:
        write_validation_rejects(run)
        raise RejectBudgetError(f"before scoring: {exc}") from None


def _take_lease(cfg: LnRayConfig, run: RunFolder, command: str) -> Lease:
    """The output's lease for this run, and a writable output, checked before any work."""
    lease = run.root.lease(run.run_id, command, cfg.output.lease_timeout_s)
    try:
        lease.acquire()
    except LeaseHeld as exc:
        raise OutputError(str(exc)) from None
    except OSError as exc:
        raise OutputError(f"output.path is not writable: {type(exc).__name__}: {exc}") from None
    try:
        run.check_writable()
    except OutputError:
        lease.release()
        raise
    lease.start_heartbeat()
    return lease


def _compact(cache: ScoreCache, buckets: int) -> dict[str, object]:
    """Fold the score cache's parts into its buckets; a failure costs only file count (the next
    run folds what is left), so it is logged and the run goes on."""
    try:
        return cache.compact(buckets, reduce_partitions())
    except Exception as exc:
        log.warning("the score cache was not compacted (the next run will): %s", exc)
        return {"error": f"{type(exc).__name__}: {exc}"}


def _cached_traces(cache: ScoreCache, folded: bool) -> int:
    """Traces in the cache: once folded, one row per trace, counted from the files' footers;
    else (parts left, a trace perhaps twice) counted by id."""
    return cache.stored_rows() if folded else len(cache.trace_ids())


def run_select(cfg: LnRayConfig) -> RunManifest:
    """Re-run selections, teacher table and curated set over a finished run's scores.

    The new reduce outputs go into a run folder of their own; the published scores stay where
    they are, and the new manifest names both. It holds the output's lease while it runs.

    Returns:
        The updated manifest.
    """
    read_manifest(cfg.output.path)  # a finished run to select over, before taking the lease
    run = OutputRoot(cfg.output.path).new_run()
    try:
        lease = _take_lease(cfg, run, "select")
    except OutputError as exc:
        raise JobError(storage.redact_url(str(exc))) from None
    try:
        published = PublishedRun.open(cfg.output.path)  # the run published last, now ours
        timeline = Timeline(cfg.compute, run)
        with _unpublished(run, time.time()):
            connect_ray(cfg.compute)
            with timeline.run(REDUCE) as record:
                text = published.manifest.text_output
                selection = reduce_scores(published, text, run, cfg.selection, cfg.output)
                record.update(prompts=selection["prompts"])
            lease.check()
        before = published.manifest
        manifest = before.replace(
            run_id=run.run_id,
            selection={k: v for k, v in selection.items() if k != "reduce_s"},
            config={**before.config, "selection": to_dict(cfg)["selection"]},
            timings={**before.timings, "reduce_s": timeline.seconds(REDUCE.name)},
            stages={**before.stages, **timeline.stages},
            finished_at=iso(time.time()),
        )
        return _publish(run, REDUCE_OUTPUTS, manifest.redacted(), cfg.output.keep_runs)
    finally:
        lease.release()


def read_manifest(output_path: str) -> RunManifest:
    """The manifest of the run published under ``output_path``.

    Raises:
        JobError: Nothing has been published there.
    """
    try:
        return PublishedRun.open(output_path).manifest
    except OutputError as exc:
        raise JobError(str(exc)) from None


def _publish(
    run: RunFolder, names: tuple[str, ...], manifest: RunManifest, keep_runs: int
) -> RunManifest:
    """Publish the run; when that fails, remove its folder and say why."""
    try:
        return run.publish(names, manifest, keep_runs)
    except OutputError as exc:
        run.discard()
        raise JobError(storage.redact_url(str(exc))) from None
    except BaseException:
        run.discard()
        raise
