"""The Ray Data job: read -> prepare -> score -> scores/ + rejects/ -> reduce -> manifest.json.

``run_score`` is the whole job; ``run_reduce`` is its reduce stage alone (selections, teachers,
curated set), which ``ln-ray select`` re-runs over finished scores with other selection options.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

import ln_ray
from ln_ray.aggregate.curate import (
    curate_batch,
    curated_schema,
    extra_schema,
    extra_types,
    keep_selected,
)
from ln_ray.aggregate.select import select_prompt
from ln_ray.aggregate.teachers import count_wins, rank_teachers, teacher_stats
from ln_ray.config import LnRayConfig, to_dict
from ln_ray.io import storage
from ln_ray.io.shards import TraceShardDatasource
from ln_ray.pipeline.stages import ScoreStage, prepare_batch
from ln_ray.schema import (
    REJECTS_SCHEMA,
    SCORED_ROWS_SCHEMA,
    SCORES_SCHEMA,
    SELECTIONS_SCHEMA,
    TEACHERS_SCHEMA,
)

log = logging.getLogger(__name__)

ROWS_DIR = "_rows"  # every input row after scoring, scored or rejected (source of the curated set)
OUTPUT_DIRS = ("scores", "rejects", "selections", "teachers", "curated")
MANIFEST = "manifest.json"
_NO_ROWS = {
    "rows_read": 0,
    "rows_scored": 0,
    "rows_rejected": 0,
    "tokens_scored": 0,
    "model_tokens": 0,
}


class JobError(RuntimeError):
    """The run cannot start or finish; the message says why."""


def connect_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as ``ray job submit`` sets), else start local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = True


def run_score(cfg: LnRayConfig) -> dict[str, Any]:
    """Run the whole job and write every output under ``output.path``.

    Args:
        cfg: A validated config.

    Returns:
        The manifest (also written to ``output.path/manifest.json``).

    Raises:
        JobError: For problems with the whole run, before any scoring starts.
    """
    import ray

    from ln_ray.score.student import StudentError, check_student

    started = time.time()
    try:
        files = storage.list_input_files(cfg.input.path, cfg.input.format)
        identity = check_student(cfg.student)
    except (storage.InputError, StudentError) as exc:
        raise JobError(str(exc)) from None
    out_fs, out_root = storage.filesystem(cfg.output.path)
    _prepare_output(out_fs, out_root)
    connect_ray()
    log.info("scoring %d input files with %s", len(files), identity)

    in_fs, _ = storage.filesystem(cfg.input.path)
    urls = {path: storage.full_url(in_fs, path) for path, _ in files}
    datasource = TraceShardDatasource(
        [path for path, _ in files],
        dict(files),
        urls,
        cfg.input.columns,
        filesystem=storage.arrow_filesystem(in_fs),
    )
    compute = cfg.compute
    rows = (
        ray.data.read_datasource(datasource, num_cpus=compute.prepare_cpus)
        .map_batches(
            prepare_batch,
            fn_kwargs={
                "student": cfg.student,
                "segment": cfg.segment,
                "max_response_chars": cfg.scoring.max_response_chars,
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
            },
            batch_format="pyarrow",
            batch_size=compute.batch_traces,
            compute=ray.data.ActorPoolStrategy(size=compute.actors),
            num_cpus=compute.cpus_per_actor,
            num_gpus=compute.gpus_per_actor,
        )
    )
    arrow_fs = storage.arrow_filesystem(out_fs)
    rows.write_parquet(storage.join(out_root, ROWS_DIR), filesystem=arrow_fs)
    scored_at = time.time()

    staged = ray.data.read_parquet(
        storage.join(out_root, ROWS_DIR), filesystem=arrow_fs, schema=SCORED_ROWS_SCHEMA
    )
    staged.map_batches(_scores_part, batch_format="pyarrow").write_parquet(
        storage.join(out_root, "scores"), filesystem=arrow_fs
    )
    staged.map_batches(_rejects_part, batch_format="pyarrow").write_parquet(
        storage.join(out_root, "rejects"), filesystem=arrow_fs
    )
    per_file = _per_file_counts(staged)
    manifest = {
        "run_id": uuid.uuid4().hex,
        "started_at": _iso(started),
        "config": _redacted(to_dict(cfg)),
        "student": {"model": cfg.student.model, "identity": identity},
        "inputs": [
            {"path": urls[path], "format": fmt, **per_file.get(urls[path], _NO_ROWS)}
            for path, fmt in files
        ],
        "counts": _counts(per_file),
        "timings": {"score_s": round(scored_at - started, 3)},
        "versions": _versions(),
    }
    manifest.update(run_reduce(cfg, manifest=manifest))
    manifest["timings"]["total_s"] = round(time.time() - started, 3)
    tokens = manifest["counts"]["tokens_scored"]
    manifest["throughput"] = {
        "tokens_per_s": round(tokens / max(scored_at - started, 1e-9), 1),
        "model_tokens_per_s": round(
            manifest["counts"]["model_tokens"] / max(scored_at - started, 1e-9), 1
        ),
    }
    manifest["finished_at"] = _iso(time.time())
    storage.write_json(storage.join(cfg.output.path, MANIFEST), manifest)
    return manifest


def run_reduce(cfg: LnRayConfig, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Selections, teacher table and curated set from ``scores/`` and ``_rows/``.

    Args:
        cfg: The config (``selection.*`` and ``output.path`` are used).
        manifest: The scoring run's manifest; when None (``ln-ray select``), the existing
            manifest.json is updated instead.

    Returns:
        The manifest entries the reduce stage owns (``selection``, ``timings.reduce_s``).
    """
    import ray

    connect_ray()
    started = time.time()
    out_fs, out_root = storage.filesystem(cfg.output.path)
    arrow_fs = storage.arrow_filesystem(out_fs)
    for name in ("selections", "teachers", "curated"):
        _remove(out_fs, storage.join(out_root, name))
    scores = ray.data.read_parquet(
        storage.join(out_root, "scores"), filesystem=arrow_fs, schema=SCORES_SCHEMA
    )
    has_correct = _count_valid(scores, "correct") > 0
    partitions = _reduce_partitions()
    filter_correct = cfg.selection.require_correct and has_correct
    columns = ["prompt_id", "teacher", "trace_id", "correct", "lalp", "galp", "rsr"]
    selections = (
        scores.select_columns(columns)
        .groupby("prompt_id", num_partitions=partitions)
        .map_groups(
            select_prompt, fn_kwargs={"filter_correct": filter_correct}, batch_format="pandas"
        )
        .materialize()
    )
    selections.map_batches(_cast(SELECTIONS_SCHEMA), batch_format="pyarrow").write_parquet(
        storage.join(out_root, "selections"), filesystem=arrow_fs
    )
    chosen = selections.select_columns(["metric", "teacher", "trace_id"]).to_pandas()
    stats = (
        scores.select_columns(["teacher", "lalp", "galp", "rsr", "avg_rank", "avg_surprisal"])
        .groupby("teacher", num_partitions=partitions)
        .map_groups(
            teacher_stats,
            fn_kwargs={
                "samples": cfg.selection.bootstrap_samples,
                "confidence": cfg.selection.confidence,
                "seed": cfg.selection.seed,
            },
            batch_format="pandas",
        )
        .to_pandas()
    )
    table = rank_teachers(stats, count_wins(chosen))
    _write_table(
        pa.Table.from_pandas(table, schema=TEACHERS_SCHEMA, preserve_index=False),
        storage.join(out_root, "teachers"),
        out_fs,
    )
    picked = chosen[chosen["metric"] == "lalp"]
    subset = (
        ray.data.read_parquet(
            storage.join(out_root, ROWS_DIR), filesystem=arrow_fs, schema=SCORED_ROWS_SCHEMA
        )
        .map_batches(
            keep_selected,
            fn_kwargs={"selected": frozenset(picked["trace_id"])},
            batch_format="pyarrow",
        )
        .materialize()
    )
    kinds = subset.map_batches(extra_types, batch_format="pyarrow").take_all()
    schema = curated_schema(extra_schema([(k["column"], k["kind"]) for k in kinds]))
    subset.map_batches(
        curate_batch, fn_kwargs={"schema": schema}, batch_format="pyarrow"
    ).write_parquet(storage.join(out_root, "curated"), filesystem=arrow_fs)

    n_prompts = scores.select_columns(["prompt_id"]).unique("prompt_id")
    entries = {
        "selection": {
            "require_correct": cfg.selection.require_correct,
            "filtered_on_correct": filter_correct,
            "prompts": len(n_prompts),
            "prompts_selected": len(picked),
            "bootstrap_samples": cfg.selection.bootstrap_samples,
            "confidence": cfg.selection.confidence,
        },
    }
    reduce_s = round(time.time() - started, 3)
    if manifest is None:
        url = storage.join(cfg.output.path, MANIFEST)
        existing = storage.read_json(url)
        existing.update(entries)
        existing.setdefault("timings", {})["reduce_s"] = reduce_s
        existing["config"]["selection"] = to_dict(cfg)["selection"]
        storage.write_json(url, existing)
        return existing
    manifest["timings"]["reduce_s"] = reduce_s
    return entries


def read_teacher_table(output_path: str) -> pd.DataFrame:
    """The teacher table of a finished run."""
    import pyarrow.parquet as pq

    fs, root = storage.filesystem(output_path)
    path = storage.join(root, "teachers")
    if not fs.exists(path):
        raise JobError(f"no teacher table under {output_path!r}: has the job finished?")
    return pq.read_table(path, filesystem=storage.arrow_filesystem(fs)).to_pandas()


def _scores_part(table: pa.Table) -> pa.Table:
    scored = table.filter(pc.is_null(table["reject_reason"]))
    return scored.select(SCORES_SCHEMA.names).cast(SCORES_SCHEMA)


def _rejects_part(table: pa.Table) -> pa.Table:
    rejected = table.filter(pc.is_valid(table["reject_reason"]))
    return (
        rejected.select(["source_file", "row_number", "prompt_id", "teacher", "reject_reason"])
        .rename_columns(REJECTS_SCHEMA.names)
        .cast(REJECTS_SCHEMA)
    )


def _count_valid(ds, column: str) -> int:
    counts = ds.select_columns([column]).map_batches(
        lambda t: pa.table({"n": [t.num_rows - t[column].null_count]}), batch_format="pyarrow"
    )
    return int(counts.sum("n") or 0)


def _reduce_partitions() -> int:
    """Shuffle partitions for groupbys: one per cluster CPU (Ray defaults to 200, for big data)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _cast(schema: pa.Schema):
    def cast(table: pa.Table) -> pa.Table:
        return table.select(schema.names).cast(schema)

    return cast


def _per_file_counts(staged) -> dict[str, dict[str, int]]:
    def flags(table: pa.Table) -> pa.Table:
        rejected = pc.is_valid(table["reject_reason"])
        return pa.table(
            {
                "source_file": table["source_file"],
                "rows_scored": pc.cast(pc.invert(rejected), pa.int64()),
                "rows_rejected": pc.cast(rejected, pa.int64()),
                "tokens_scored": pc.fill_null(table["n_tokens"], 0),
                "model_tokens": pc.fill_null(table["model_tokens"], 0),
            }
        )

    summed = (
        staged.map_batches(flags, batch_format="pyarrow")
        .groupby("source_file", num_partitions=_reduce_partitions())
        .sum(["rows_scored", "rows_rejected", "tokens_scored", "model_tokens"])
        .to_pandas()
    )
    counts = {}
    for record in summed.to_dict("records"):
        entry = {
            key.removeprefix("sum(").removesuffix(")"): int(value)
            for key, value in record.items()
            if key != "source_file"
        }
        entry["rows_read"] = entry["rows_scored"] + entry["rows_rejected"]
        counts[record["source_file"]] = entry
    return counts


def _counts(per_file: dict[str, dict[str, int]]) -> dict[str, int]:
    return {key: sum(entry[key] for entry in per_file.values()) for key in _NO_ROWS}


def _prepare_output(fs, root: str) -> None:
    """Fail fast on an unwritable output, then clear the outputs of any earlier run."""
    try:
        fs.makedirs(root, exist_ok=True)
        probe = storage.join(root, f".ln-ray-probe-{uuid.uuid4().hex}")
        with fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        fs.rm(probe)
    except Exception as exc:
        raise JobError(f"output.path is not writable: {type(exc).__name__}: {exc}") from None
    for name in (*OUTPUT_DIRS, ROWS_DIR, MANIFEST):
        _remove(fs, storage.join(root, name))


def _remove(fs, path: str) -> None:
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _write_table(table: pa.Table, folder: str, fs) -> None:
    import pyarrow.parquet as pq

    fs.makedirs(folder, exist_ok=True)
    pq.write_table(
        table, storage.join(folder, "part-0.parquet"), filesystem=storage.arrow_filesystem(fs)
    )


def _redacted(config: dict[str, Any]) -> dict[str, Any]:
    """Drop credentials that a URL may carry (``s3://KEY:SECRET@bucket``)."""
    import re

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, str):
            return re.sub(r"(?<=://)[^/@\s]+@", "***@", value)
        return value

    return scrub(config)


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
