"""The Ray Data job: read -> prepare -> score -> join with the score cache -> outputs -> reduce.

``run_score`` is the whole job; ``run_select`` re-runs only the reduce stage over a finished run.
Everything a run writes is staged and published at the end (``outputs.py``); scores persist in the
score cache as they are computed (``io/cache.py``), so a re-run after an interruption, or a
scheduled refresh over a grown corpus, scores only traces it has not scored before.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

import ln_ray
from ln_ray.config import ComputeConfig, LnRayConfig, to_dict
from ln_ray.io import cache, storage
from ln_ray.io.shards import TraceShardDatasource, count_source_rows
from ln_ray.pipeline import outputs
from ln_ray.pipeline.outputs import MANIFEST, REDUCE_OUTPUTS, ROWS_DIR, SCORE_OUTPUTS, RunPaths
from ln_ray.pipeline.reduce import cast_to, reduce_partitions, reduce_scores
from ln_ray.pipeline.stages import ScoreStage, prepare_batch
from ln_ray.schema import (
    CACHE_SCHEMA,
    REJECTS_SCHEMA,
    ROW_META_SCHEMA,
    SCORED_ROWS_SCHEMA,
    SCORES_SCHEMA,
)

log = logging.getLogger(__name__)

_COUNTS = ("rows_read", "rows_scored", "rows_rejected", "tokens_scored", "model_tokens")
_PER_FILE = (*_COUNTS[1:], "shard_errors", "tokens_scored_now", "model_tokens_now")
_COUNTERS = (*_PER_FILE, "unscored")  # per block, by (file, reject reason kind)
_SCORED_DIR = "_scored"  # the scoring stage's output, before the cache join and duplicate marks


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
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
    # The reduce stage's groupbys move small tables; a sort shuffle runs them as plain tasks,
    # where the hash shuffle first starts aggregator actors (seconds each on a small cluster).
    context = DataContext.get_current()
    context.shuffle_strategy = (
        ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        if compute.shuffle == "sort"
        else ShuffleStrategy.SHUFFLE_V2
    )
    # The job reads back its own staged Parquet five times. Ray Data's V2 Parquet reader plans
    # each read as a file-listing task, then read tasks (1-2 s per read on a small cluster);
    # the V1 reader lists in the driver (7 s less per run). RAY_DATA_USE_DATASOURCE_V2 overrides.
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        context.use_datasource_v2 = False


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
    import ray

    from ln_ray.score.student import StudentError, check_student

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
    counter = ray.remote(num_cpus=0.1)(count_source_rows)
    expected_rows = [counter.remote(urls[path], fmt) for path, fmt in files]
    try:
        _score_rows(cfg, files, shown, in_fs, paths, cache_url)
        scored_at = time.time()
        in_cache = len(cache.cached_trace_ids(cache_url))
        scored_now = in_cache - len(cached)
        log.info(
            "scored %d new traces in %.1fs; assembling outputs", scored_now, scored_at - started
        )
        rows, duplicates = _assemble_rows(paths, cache_url, in_cache)
        per_file, reasons = _count_rows(rows, cached)
        inputs = _check_inputs(files, shown, per_file, ray.get(expected_rows))
        assembled_at = time.time()
        log.info("selecting per prompt and ranking teachers")
        selection = reduce_scores(paths.fs, paths.staging, paths.staging, cfg.selection)
    except BaseException:
        outputs.discard(paths)
        raise
    counts = {key: sum(entry[key] for entry in inputs) for key in _COUNTS}
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
            "read_prepare_score": {
                "seconds": round(score_s, 3),
                "rows": counts["rows_read"],
                "shard_errors": sum(entry["shard_errors"] for entry in inputs),
                "traces_scored_now": scored_now,
                "tokens_scored_now": new_tokens,
                "model_tokens_now": new_model_tokens,
            },
            "assemble": {
                "seconds": round(assembled_at - scored_at, 3),
                "rows_scored": counts["rows_scored"],
                "rows_rejected": counts["rows_rejected"],
                "duplicates": duplicates,
            },
            "reduce": {"seconds": selection["reduce_s"], "prompts": selection["prompts"]},
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
    _publish(paths, (*SCORE_OUTPUTS, *REDUCE_OUTPUTS), manifest)
    log.info("published run %s to %s", paths.run_id, storage.redact_url(cfg.output.path))
    return manifest


def run_select(cfg: LnRayConfig) -> dict[str, Any]:
    """Re-run selections, teacher table and curated set over a finished run's scores.

    Returns:
        The updated manifest.
    """
    connect_ray(cfg.compute)
    paths = RunPaths.create(cfg.output.path)
    manifest_url = storage.full_url(paths.fs, paths.final(MANIFEST))
    if not paths.fs.exists(paths.final(MANIFEST)):
        raise JobError(
            f"no finished run under {storage.redact_url(cfg.output.path)!r} "
            "(manifest.json is missing)"
        )
    manifest = storage.read_json(manifest_url)
    try:
        selection = reduce_scores(paths.fs, paths.root, paths.staging, cfg.selection)
    except BaseException:
        outputs.discard(paths)
        raise
    manifest["selection"] = {k: v for k, v in selection.items() if k != "reduce_s"}
    manifest["config"]["selection"] = to_dict(cfg)["selection"]
    manifest["timings"]["reduce_s"] = selection["reduce_s"]
    manifest.setdefault("stages", {})["reduce"] = {
        "seconds": selection["reduce_s"],
        "prompts": selection["prompts"],
    }
    manifest["finished_at"] = _iso(time.time())
    manifest = outputs.redacted(manifest)
    _publish(paths, REDUCE_OUTPUTS, manifest)
    return manifest


def read_teacher_table(output_path: str) -> pd.DataFrame:
    """The teacher table of a finished run."""
    import pyarrow.parquet as pq

    fs, root = storage.filesystem(output_path)
    if not fs.exists(storage.join(root, MANIFEST)):
        raise JobError(
            f"no finished run under {storage.redact_url(output_path)!r} (manifest.json is missing)"
        )
    table = pq.read_table(storage.join(root, "teachers"), filesystem=storage.arrow_filesystem(fs))
    return table.to_pandas()


def _publish(paths: RunPaths, names: tuple[str, ...], manifest: dict[str, Any]) -> None:
    """Publish the staged outputs; when that fails, remove the staging area and say why."""
    try:
        outputs.publish(paths, names, manifest)
    except outputs.OutputError as exc:
        outputs.discard(paths)
        raise JobError(storage.redact_url(str(exc))) from None
    except BaseException:
        outputs.discard(paths)
        raise


def _score_rows(cfg, files, urls, in_fs, paths: RunPaths, cache_url: str) -> None:
    """Stream shards through preparation and the scoring actors; stage every row, with the
    scores of the traces scored now."""
    import ray

    datasource = TraceShardDatasource(
        [path for path, _ in files],
        dict(files),
        urls,
        cfg.input.columns,
        filesystem=storage.arrow_filesystem(in_fs),
    )
    compute = cfg.compute
    (
        ray.data.read_datasource(datasource, num_cpus=compute.prepare_cpus)
        .map_batches(
            prepare_batch,
            fn_kwargs={
                "student": cfg.student,
                "segment": cfg.segment,
                "scoring": cfg.scoring,
            },
            batch_format="pyarrow",
            batch_size=64,
            num_cpus=compute.prepare_cpus,
        )
        .map_batches(
            ScoreStage,
            fn_constructor_kwargs={
                "student": cfg.student,
                "scoring": cfg.scoring,
                "compute": compute,
                "cache_url": cache_url,
            },
            batch_format="pyarrow",
            batch_size=compute.batch_traces,
            compute=ray.data.ActorPoolStrategy(size=compute.actors),
            num_cpus=compute.cpus_per_actor,
            num_gpus=compute.gpus_per_actor,
        )
        .write_parquet(paths.staged(_SCORED_DIR), filesystem=paths.arrow_fs)
    )


def _assemble_rows(paths: RunPaths, cache_url: str, in_cache: int) -> tuple[Any, int]:
    """Complete rows with the scores of traces found in the cache, mark duplicates, write _rows/,
    scores/ and rejects/.

    Rows scored by this run already carry their scores; only rows whose trace a scoring actor
    found in the cache are joined with it, so a run over new traces joins nothing. ``in_cache``
    is the number of distinct traces in the cache now.

    Returns:
        The finished rows (materialized) and the number of duplicate rows rejected.
    """
    import ray

    partitions = reduce_partitions()
    staged = ray.data.read_parquet(
        paths.staged(_SCORED_DIR), filesystem=paths.arrow_fs, schema=SCORED_ROWS_SCHEMA
    )  # read again by each use below, the columns it needs only (rows carry every step's score)
    duplicates = _find_duplicates(staged, partitions)
    rows = staged
    hits = (
        staged.select_columns([*ROW_META_SCHEMA.names, "n_tokens"])
        .map_batches(_from_cache, batch_format="pyarrow")
        .materialize()
    )
    if hits.count():
        rows = staged.map_batches(
            lambda t: t.filter(pc.invert(_is_cache_hit(t))), batch_format="pyarrow"
        ).union(_join_cache(hits, cache_url, in_cache, partitions))
    rows = rows.map_batches(
        _finish_rows, fn_kwargs={"duplicates": duplicates}, batch_format="pyarrow"
    ).materialize()
    rows.write_parquet(paths.staged(ROWS_DIR), filesystem=paths.arrow_fs)
    rows.map_batches(_scores_part, batch_format="pyarrow").write_parquet(
        paths.staged("scores"), filesystem=paths.arrow_fs
    )
    rows.map_batches(_rejects_part, batch_format="pyarrow").write_parquet(
        paths.staged("rejects"), filesystem=paths.arrow_fs
    )
    for name, schema in (("scores", SCORES_SCHEMA), ("rejects", REJECTS_SCHEMA)):
        outputs.ensure_table(paths.fs, paths.staged(name), schema)
    paths.fs.rm(paths.staged(_SCORED_DIR), recursive=True)
    return rows, len(duplicates)


def _is_cache_hit(table: pa.Table) -> pa.Array:
    """Accepted rows that came through scoring without scores: their trace was in the cache."""
    return pc.and_(pc.is_null(table["reject_reason"]), pc.is_null(table["n_tokens"]))


def _from_cache(table: pa.Table) -> pa.Table:
    return table.filter(_is_cache_hit(table)).select(ROW_META_SCHEMA.names)


def _join_cache(rows, cache_url: str, in_cache: int, partitions: int):
    """Rows (``ROW_META_SCHEMA``) with their scores from the cache, in ``SCORED_ROWS_SCHEMA``."""
    import ray

    cache_fs, _ = storage.filesystem(cache_url)
    scores = ray.data.read_parquet(
        cache.cache_files(cache_url),
        filesystem=storage.arrow_filesystem(cache_fs),
        schema=CACHE_SCHEMA,
    )
    if scores.count() > in_cache:
        # A retried batch or a duplicate row stored a trace twice (with equal values): keep one.
        scores = scores.groupby("trace_id", num_partitions=partitions).map_groups(
            lambda group: group.slice(0, 1), batch_format="pyarrow"
        )
    joined = rows.join(scores, "left_outer", num_partitions=partitions, on=("trace_id",))
    return joined.map_batches(cast_to(SCORED_ROWS_SCHEMA), batch_format="pyarrow")


def _find_duplicates(rows, partitions: int) -> dict[tuple[str, int], str]:
    """Rows repeating an earlier (prompt_id, teacher, response): the reason, by (file, row)."""

    def later_copies(group: pa.Table) -> pa.Table:
        ordered = group.sort_by([("source_file", "ascending"), ("row_number", "ascending")])
        first = ordered.slice(0, 1).to_pylist()[0]
        rest = ordered.slice(1)
        reason = f"duplicate of {first['source_file']} row {first['row_number']}"
        return rest.select(["source_file", "row_number"]).append_column(
            "reason", pa.array([reason] * rest.num_rows, pa.string())
        )

    copies = (
        rows.select_columns(["dup_key", "source_file", "row_number"])
        .map_batches(lambda t: t.filter(pc.is_valid(t["dup_key"])), batch_format="pyarrow")
        .groupby("dup_key", num_partitions=partitions)
        .map_groups(later_copies, batch_format="pyarrow")
        .take_all()
    )
    return {(c["source_file"], c["row_number"]): c["reason"] for c in copies}


def _finish_rows(table: pa.Table, duplicates: dict[tuple[str, int], str]) -> pa.Table:
    reasons = table["reject_reason"]
    if duplicates:
        keys = zip(table["source_file"].to_pylist(), table["row_number"].to_pylist())
        marks = [duplicates.get(key) for key in keys]
        reasons = pc.coalesce(reasons, pa.array(marks, pa.string()))
    # A shard's read error may quote its URL.
    reasons = pc.replace_substring_regex(reasons, storage.USERINFO, storage.MASKED)
    index = table.schema.get_field_index("reject_reason")
    return (
        table.set_column(index, "reject_reason", reasons)
        .select(SCORED_ROWS_SCHEMA.names)
        .cast(SCORED_ROWS_SCHEMA)
    )


def _scores_part(table: pa.Table) -> pa.Table:
    return cast_to(SCORES_SCHEMA)(table.filter(pc.is_null(table["reject_reason"])))


def _rejects_part(table: pa.Table) -> pa.Table:
    rejected = table.filter(pc.is_valid(table["reject_reason"]))
    columns = ["source_file", "row_number", "prompt_id", "teacher", "reject_reason"]
    return rejected.select(columns).rename_columns(REJECTS_SCHEMA.names).cast(REJECTS_SCHEMA)


def _count_rows(rows, cached) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Per input file, the manifest's row and token counters; over all files, how many rows were
    rejected for each kind of reason (details stay in rejects/).

    One pass over the finished rows: each block sums its own counters by (file, reason kind),
    the driver adds the blocks' sums.

    Raises:
        JobError: An accepted row has no scores (its trace is neither scored nor in the cache).
    """

    def partial_sums(table: pa.Table) -> pa.Table:
        rejected = pc.is_valid(table["reject_reason"])
        ids = pc.fill_null(table["trace_id"], "").to_pylist()
        new = pc.and_(pa.array(~cache.contains(cached, ids)), pc.invert(rejected))
        reasons = table["reject_reason"].to_pylist()
        counters = pa.table(
            {
                "source_file": table["source_file"],
                "kind": pa.array([_reason_kind(r) for r in reasons], pa.string()),
                "rows_scored": pc.cast(pc.invert(rejected), pa.int64()),
                "rows_rejected": pc.cast(rejected, pa.int64()),
                "shard_errors": pc.cast(pc.is_null(table["row_number"]), pa.int64()),
                "tokens_scored": pc.if_else(rejected, 0, pc.fill_null(table["n_tokens"], 0)),
                "model_tokens": pc.if_else(rejected, 0, pc.fill_null(table["model_tokens"], 0)),
                "tokens_scored_now": pc.if_else(new, pc.fill_null(table["n_tokens"], 0), 0),
                "model_tokens_now": pc.if_else(new, pc.fill_null(table["model_tokens"], 0), 0),
                "unscored": pc.cast(_is_cache_hit(table), pa.int64()),
            }
        )
        summed = counters.group_by(["source_file", "kind"], use_threads=False).aggregate(
            [(name, "sum") for name in _COUNTERS]
        )
        return summed.rename_columns([n.removesuffix("_sum") for n in summed.column_names])

    sums = pd.DataFrame(rows.map_batches(partial_sums, batch_format="pyarrow").take_all())
    if sums.empty:
        return {}, {}
    unscored = int(sums["unscored"].sum())
    if unscored:
        raise JobError(f"{unscored} accepted rows have no scores (not scored, not in the cache)")
    per_file = sums.groupby("source_file")[list(_PER_FILE)].sum()
    kinds = sums.dropna(subset=["kind"]).groupby("kind")["rows_rejected"].sum()
    return (
        {name: {c: int(v) for c, v in counts.items()} for name, counts in per_file.iterrows()},
        {kind: int(n) for kind, n in sorted(kinds.items())},
    )


def _reason_kind(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "duplicate" if reason.startswith("duplicate of") else reason.split(":")[0]


def _check_inputs(files, urls, per_file, expected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per input file: rows read == rows scored + rows rejected, and nothing went missing."""
    inputs, lost = [], []
    for (path, fmt), source in zip(files, expected):
        counts = per_file.get(urls[path], dict.fromkeys(_PER_FILE, 0))
        entry = {"path": urls[path], "format": fmt, **source}
        entry.update(counts)
        entry["rows_read"] = counts["rows_scored"] + counts["rows_rejected"]
        readable = entry["rows_read"] - counts["shard_errors"]
        if source.get("rows_in_file") is not None and readable != source["rows_in_file"]:
            lost.append(f"{urls[path]}: {source['rows_in_file']} rows in the file, {readable} read")
        inputs.append(entry)
    if lost:
        raise JobError("rows went missing between reading and writing:\n  " + "\n  ".join(lost))
    return inputs


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
