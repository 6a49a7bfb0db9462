"""The two streaming passes over the input, as Ray Data plans.

1. ``validate_rows``: every row is read, validated and looked up in the score cache (CPU tasks;
   no tokenizer, no student) and written once to the run's ``_valid/``.
2. ``score_new_rows``: only the rows whose trace is not in the cache are read back, tokenized
   (CPU tasks) and scored by an actor pool that grows with the work, into ``_scored/``. A run
   with nothing new never starts it, so a refresh over a scored corpus loads no student.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ln_ray.config import LnRayConfig
from ln_ray.io import storage
from ln_ray.io.shards import TraceShardDatasource
from ln_ray.pipeline.outputs import VALID_DIR, RunPaths, ensure_table
from ln_ray.pipeline.stages import ScoreStage, is_new, tokenize_batch, validate_batch
from ln_ray.schema import SCORED_ROWS_SCHEMA, VALIDATED_SCHEMA

log = logging.getLogger(__name__)

SCORED_DIR = "_scored"  # the new rows after tokenizing and scoring (or their rejects)


def validate_rows(
    cfg: LnRayConfig,
    files: list[tuple[str, str]],
    urls: dict[str, str],
    in_fs: Any,
    paths: RunPaths,
    cached: np.ndarray,
) -> int:
    """Read every shard, validate each row and mark the ones whose trace is cached.

    Args:
        cfg: The run's config.
        files: ``(path, format)`` of each input file.
        urls: The URL recorded as each file's ``source_file``.
        in_fs: The input filesystem.
        paths: The run's paths.
        cached: Sorted trace ids in the score cache.

    Returns:
        The number of rows that need tokenizing and scoring.
    """
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
        ray.data.read_datasource(
            datasource, num_cpus=compute.prepare_cpus, ray_remote_args=_task_retries(cfg)
        )
        .map_batches(
            validate_batch,
            fn_kwargs={
                "segment": cfg.segment,
                "scoring": cfg.scoring,
                "student": cfg.student,
                "cached": cached,
            },
            batch_format="pyarrow",
            batch_size=256,
            num_cpus=compute.prepare_cpus,
            **_task_retries(cfg),
        )
        .write_parquet(paths.staged(VALID_DIR), filesystem=paths.arrow_fs)
    )
    ensure_table(paths.fs, paths.staged(VALID_DIR), VALIDATED_SCHEMA)
    counts = read_valid(paths, columns=["reject_reason", "cached"]).map_batches(
        lambda t: pa.table({"new": [pc.sum(pc.cast(is_new(t), pa.int64())).as_py() or 0]}),
        batch_format="pyarrow",
    )
    return int(counts.sum("new") or 0)


def score_new_rows(cfg: LnRayConfig, paths: RunPaths, cache_url: str, new_rows: int) -> None:
    """Tokenize and score the rows ``validate_rows`` found new, into ``_scored/``.

    The actor pool starts with one actor and grows to ``compute.actors`` while there is work
    for more (never past one actor per batch of new rows).
    """
    import ray

    compute = cfg.compute
    actors = max(1, min(compute.actors, math.ceil(new_rows / compute.batch_traces)))
    counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
    done, started = threading.Event(), time.time()
    reporter = threading.Thread(
        target=_report_progress,
        args=(counter, new_rows, started, done, compute.progress_s),
        daemon=True,
    )
    reporter.start()
    try:
        _tokenize_and_score(cfg, paths, cache_url, actors, ProgressReport(counter))
    finally:
        done.set()
        reporter.join()
    traces, tokens = ray.get(counter.snapshot.remote())
    log.info(progress_line(traces, new_rows, tokens, time.time() - started))
    ray.kill(counter)


def _tokenize_and_score(
    cfg: LnRayConfig, paths: RunPaths, cache_url: str, actors: int, progress: ProgressReport
) -> None:
    import ray

    compute = cfg.compute
    (
        read_valid(paths)
        .map_batches(lambda t: t.filter(is_new(t)), batch_format="pyarrow")
        .map_batches(
            tokenize_batch,
            fn_kwargs={"student": cfg.student, "segment": cfg.segment, "scoring": cfg.scoring},
            batch_format="pyarrow",
            batch_size=64,
            num_cpus=compute.prepare_cpus,
            **_task_retries(cfg),
        )
        .map_batches(
            ScoreStage,
            fn_constructor_kwargs={
                "student": cfg.student,
                "scoring": cfg.scoring,
                "compute": compute,
                "cache_url": cache_url,
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
        .write_parquet(paths.staged(SCORED_DIR), filesystem=paths.arrow_fs)
    )
    ensure_table(paths.fs, paths.staged(SCORED_DIR), SCORED_ROWS_SCHEMA)


class ProgressCounter:
    """Traces and tokens scored so far: a Ray actor in the job, the scoring actors add to it."""

    def __init__(self) -> None:
        self.traces = 0
        self.tokens = 0

    def add(self, traces: int, tokens: int) -> None:
        self.traces += traces
        self.tokens += tokens

    def snapshot(self) -> tuple[int, int]:
        return self.traces, self.tokens


class ProgressReport:
    """What a scoring actor holds to report its batches: ``add(traces, tokens)``."""

    def __init__(self, counter: Any) -> None:
        self._counter = counter

    def add(self, traces: int, tokens: int) -> None:
        self._counter.add.remote(traces, tokens)


def progress_line(traces: int, total: int, tokens: int, seconds: float) -> str:
    """One progress line: traces done of the total, tokens, tokens/s and the time left."""
    rate = traces / seconds if seconds > 0 else 0.0
    left = f"ETA {_duration((total - traces) / rate)}" if rate and traces < total else "ETA -"
    share = traces / total if total else 1.0
    return (
        f"scoring: {traces:,} of {total:,} traces ({share:.0%}), {tokens:,} tokens, "
        f"{tokens / max(seconds, 1e-9):,.0f} tokens/s, {_duration(seconds)} elapsed, {left}"
    )


def _report_progress(
    counter: Any, total: int, started: float, done: threading.Event, interval: float
) -> None:
    import ray

    while not done.wait(interval):
        try:
            traces, tokens = ray.get(counter.snapshot.remote(), timeout=interval)
        except Exception as exc:  # a missed report is no reason to stop the run
            log.debug("no progress report: %s", exc)
            continue
        log.info(progress_line(traces, total, tokens, time.time() - started))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def read_valid(paths: RunPaths, columns: list[str] | None = None) -> Any:
    """The run's validated rows (``_valid/``) as a dataset."""
    import ray

    schema = (
        VALIDATED_SCHEMA
        if columns is None
        else pa.schema([VALIDATED_SCHEMA.field(name) for name in columns])
    )
    return ray.data.read_parquet(
        paths.staged(VALID_DIR), filesystem=paths.arrow_fs, columns=columns, schema=schema
    )


def _task_retries(cfg: LnRayConfig) -> dict[str, int]:
    # Ray Data retries failed tasks without end by default; a poison input would loop forever.
    return {"max_retries": cfg.compute.max_retries}
