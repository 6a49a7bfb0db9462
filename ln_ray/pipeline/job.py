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
from typing import Any

import pandas as pd

import ln_ray
from ln_ray.config import ComputeConfig, LnRayConfig, to_dict
from ln_ray.io import cache, storage
from ln_ray.pipeline import outputs
from ln_ray.pipeline.accounting import (
    COUNTS,
    AccountingError,
    check_inputs,
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
from ln_ray.pipeline.passes import score_new_rows, validate_rows
from ln_ray.pipeline.reduce import cluster_cpus, reduce_scores
from ln_ray.schema import LATE_REJECTS_SCHEMA

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
        JobError: A problem with the whole run (found before any scoring starts), or rows that
            went missing between reading and writing.
    """

    from ln_ray.score.student import check_student
    from ln_ray.score.vetting import StudentError

    started = time.time()
    try:
        files, skipped = storage.list_input_files(cfg.input.path, cfg.input.format)
        storage.check_output_apart(cfg.input.path, cfg.output.path)
        identity = check_student(
            cfg.student,
            want_gpu=cfg.compute.gpus_per_actor > 0,
            max_tokens=cfg.scoring.max_tokens,
            view=cfg.scoring.render,
        )
        paths = RunPaths.create(cfg.output.path)
        outputs.check_writable(paths)
    except (storage.InputError, StudentError, outputs.OutputError) as exc:
        raise JobError(storage.redact_url(str(exc))) from None
    connect_ray(cfg.compute)
    cache_url = paths.cache(cache.cache_key(identity, cfg.scoring))
    cached = cache.cached_trace_ids(cache_url)
    log.info(
        "run %s: %d input files, student %s, %d traces already in the score cache",
        paths.run_id,
        len(files),
        identity,
        len(cached),
    )
    in_fs, _ = storage.filesystem(cfg.input.path)
    urls = {path: storage.full_url(in_fs, path) for path, _ in files}  # to open files
    shown = {path: storage.redact_url(url) for path, url in urls.items()}  # to record or show
    # Rows per file, counted independently of the pipeline (and in parallel with it).
    expected_rows = start_counting([(urls[path], fmt) for path, fmt in files])
    try:
        new_rows = validate_rows(cfg, files, shown, in_fs, paths, cached)
        validated_at = time.time()
        log.info("%d rows to tokenize and score (the rest are cached or rejected)", new_rows)
        late_rejects, kernels = LATE_REJECTS_SCHEMA.empty_table(), []
        if new_rows:
            late_rejects, kernels = score_new_rows(cfg, paths, cache_url, new_rows)
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
            paths, cache_url, late_rejects, cfg.output.cache_buckets if folded else None
        )
        per_file, reasons = count_rows(rows, cached)
        inputs = check_inputs(files, shown, per_file, counted(expected_rows))
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
    except AccountingError as exc:
        outputs.discard(paths)
        raise JobError(str(exc)) from None
    except BaseException:
        outputs.discard(paths)
        raise
    counts = {key: sum(entry[key] for entry in inputs) for key in COUNTS}
    counts["traces_scored_now"] = scored_now
    score_s = max(scored_at - started, 1e-9)
    new_tokens = sum(entry["tokens_scored_now"] for entry in inputs)
    new_model_tokens = sum(entry["model_tokens_now"] for entry in inputs)
    manifest = {
        "run_id": paths.run_id,
        "started_at": _iso(started),
        "finished_at": _iso(time.time()),
        "config": to_dict(cfg),
        "student": {"model": cfg.student.model, "identity": identity},
        "score_cache": cache_url,
        "inputs": inputs,
        "skipped_files": [storage.full_url(in_fs, path) for path in skipped],
        "counts": counts,
        "reject_reasons": reasons,
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
                "attention": kernels,  # the kernel each scoring actor ran, and its dtype
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


def run_select(cfg: LnRayConfig) -> dict[str, Any]:
    """Re-run selections, teacher table and curated set over a finished run's scores.

    The new reduce outputs go into a run folder of their own; the published scores stay where
    they are, and the new manifest names both.

    Returns:
        The updated manifest.
    """
    connect_ray(cfg.compute)
    manifest = read_manifest(cfg.output.path)
    paths = RunPaths.create(cfg.output.path)
    try:
        selection = reduce_scores(
            paths.fs,
            _located(paths, manifest, "scores"),
            _located(paths, manifest, ROWS_DIR),
            _located(paths, manifest, text_output(manifest)),
            paths.staging,
            cfg.selection,
        )
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
