"""The Ray toolbox every stage of the job uses: joining the cluster, sizing shuffles, reading a
run's validated rows, writing datasets into a folder, and bringing small results into the
driver."""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from typing import Any

import pandas as pd
import polars as pl
import pyarrow as pa

from ln_ray.config import ComputeConfig
from ln_ray.io.folder import Folder
from ln_ray.io.manifest import VALID_DIR
from ln_ray.schema import VALIDATED_SCHEMA

FILE_BYTES = 128 * 2**20  # in-memory bytes of rows per written file (Parquet compresses them)
COMPRESSION = "zstd"

log = logging.getLogger(__name__)


class ClusterTooSmall(RuntimeError):
    """The cluster did not reach ``compute.min_cpus`` / ``compute.min_gpus`` in time."""


def connect_ray(compute: ComputeConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (as ``ray job submit`` sets), else start local Ray;
    wait for the cluster the run was configured for (``wait_for_cluster``); then set this
    driver's Ray Data options (its tasks inherit them), sized for that cluster.

    Raises:
        ClusterTooSmall: The cluster did not reach its configured size in time.
    """
    import ray
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # The notice that the Ray this job starts for itself uses token authentication
            # asks nothing of the user.
            logging.getLogger(_AUTH_LOGGER).setLevel(logging.ERROR)
            # "local": a new Ray of its own, never a cluster that `ray start` left on this node
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    quiet_ray_data(compute.ray_progress)
    wait_for_cluster(compute)
    resources = ray.cluster_resources()
    log.info("Ray cluster: %g CPUs, %g GPUs", resources.get("CPU", 0), resources.get("GPU", 0))
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


_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_ray_data(progress: bool) -> None:
    """Ray Data's per-operator progress and execution logs on (``compute.ray_progress``) or off
    (the default: the job logs its own progress, and Ray Data's dumps would drown it); and never
    the warning that a task's retries are given as ``ray_remote_args``, which Ray 2.60 deprecates
    without a named parameter for them (``max_retries``, ``max_restarts``)."""
    from ray.data import DataContext
    from ray.util.annotations import RayDeprecationWarning

    context = DataContext.get_current()
    context.enable_progress_bars = progress
    context.print_on_execution_start = progress
    logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.WARNING)
    # ... and never its notice that they are off.
    logging.getLogger("ray.data._internal.progress").setLevel(
        logging.INFO if progress else logging.ERROR
    )
    warnings.filterwarnings(
        "ignore", message="`ray_remote_args` is deprecated", category=RayDeprecationWarning
    )
    # Ray Data warns that a dataset "will hang" when the cluster's free CPUs read 0 as it
    # starts; that view lags finished tasks by up to a second, so it fires between the job's
    # stages on a small cluster while nothing waits.
    dataset_log = logging.getLogger("ray.data.dataset")
    if not any(isinstance(f, _NoFalseHangWarning) for f in dataset_log.filters):
        dataset_log.addFilter(_NoFalseHangWarning())


class _NoFalseHangWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "does not have any available CPUs" not in record.getMessage()


def wait_for_cluster(compute: ComputeConfig, poll_s: float = 1.0) -> None:
    """Wait until the cluster has ``compute.min_cpus`` CPUs and ``compute.min_gpus`` GPUs.

    A RayJob's driver starts as soon as the head is ready, before its workers join (the shipped
    head has no CPUs): the reads, shuffles and row counts sized from the cluster at that moment
    would be planned for a cluster of one node. Waiting up to ``compute.wait_for_cluster_s``
    lets the job plan for the cluster it will run on; a line every ``compute.progress_s`` says
    what it still waits for. While it waits, it asks an autoscaler for that cluster
    (``request_resources``: a cluster launched with no workers has no demand to scale on
    before the job starts its tasks), and withdraws the request once the wait is over.

    Raises:
        ClusterTooSmall: The cluster is still smaller after ``compute.wait_for_cluster_s``.
    """
    import ray

    if not _missing(ray.cluster_resources(), compute):
        return
    _request_cluster(compute)
    try:
        started = time.monotonic()
        said: float | None = None  # when the last waiting line was logged
        while missing := _missing(ray.cluster_resources(), compute):
            now = time.monotonic()
            if now - started >= compute.wait_for_cluster_s:
                raise ClusterTooSmall(
                    f"the Ray cluster has {missing} after {now - started:.0f}s "
                    "(compute.wait_for_cluster_s); add nodes, or lower compute.min_cpus / "
                    "compute.min_gpus to the cluster you have"
                )
            if said is None or now - said >= compute.progress_s:
                log.info("waiting for the cluster: it has %s", missing)
                said = now
            time.sleep(poll_s)
    finally:
        _request_cluster(None)


def _request_cluster(compute: ComputeConfig | None) -> None:
    """Ask an autoscaler for ``compute``'s cluster (None: withdraw the request). Only a hint:
    a cluster without an autoscaler ignores it, and a failure to ask is logged, not raised."""
    from ray.autoscaler.sdk import request_resources

    try:
        if compute is None:
            request_resources(num_cpus=0)
        else:
            request_resources(
                num_cpus=math.ceil(compute.min_cpus),
                bundles=[{"GPU": 1}] * math.ceil(compute.min_gpus),
            )
    except Exception as exc:
        log.debug("could not ask the autoscaler for the cluster: %s", exc)


def _missing(resources: dict[str, float], compute: ComputeConfig) -> str:
    """What the cluster lacks, as ``"2 of 64 CPUs, 0 of 8 GPUs"`` ("" when nothing)."""
    short = [
        f"{resources.get(key, 0):g} of {want:g} {key}s"
        for key, want in (("CPU", compute.min_cpus), ("GPU", compute.min_gpus))
        if resources.get(key, 0) < want
    ]
    return ", ".join(short)


def cluster_cpus() -> int:
    """CPUs of the connected Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def reduce_partitions() -> int:
    """Shuffle partitions for groupbys: one per cluster CPU (Ray defaults to 200, for big data)."""
    return cluster_cpus()


def grouped_by_hash(ds: Any, key: str, fn: Any, groups: int, **fn_kwargs: Any) -> Any:
    """``fn`` over whole groups of rows sharing ``key``: the rows are hashed by ``key`` into
    ``groups`` groups (a stable hash: every task of a run agrees on it), and ``fn`` runs once per
    group (not per key) on every row of its keys, the hash in a column of its own (``HASH_GROUP``)
    that ``fn`` may ignore. Nothing reaches the driver.

    Args:
        ds: The dataset (``key`` a column of it).
        key: The column whose equal values must meet (e.g. prompt_id).
        fn: ``fn(table, **fn_kwargs) -> table``, a pyarrow batch function.
        groups: How many groups (``reduce_partitions``).
    """
    return (
        ds.map_batches(
            _with_hash_group, fn_kwargs={"key": key, "groups": groups}, batch_format="pyarrow"
        )
        .groupby(HASH_GROUP, num_partitions=groups)
        .map_groups(fn, fn_kwargs=fn_kwargs, batch_format="pyarrow")
    )


HASH_GROUP = "_hash_group"


def _with_hash_group(table: pa.Table, key: str, groups: int) -> pa.Table:
    values = pl.Series(key, table[key].combine_chunks())
    group = (values.hash(seed=0) % groups).cast(pl.Int64).to_arrow()
    return table.append_column(HASH_GROUP, group)


def await_free_cpus(free: float, timeout_s: float = 10.0) -> None:
    """Wait (a few seconds at most) until the cluster has ``free`` CPUs free again (as many as
    before an actor pool started: its actors stop as the pool ends, and the next stage's reads
    would otherwise start while they still hold their CPUs)."""
    import ray

    deadline = time.time() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < free and time.time() < deadline:
        time.sleep(0.1)


def task_retries(compute: ComputeConfig) -> dict[str, int]:
    """A task's retries: Ray Data retries failed tasks without end by default, and a poison
    input would loop forever."""
    return {"max_retries": compute.max_retries}


def write_dataset(
    ds: Any, folder: Folder, name: str, task_args: dict[str, Any] | None = None
) -> None:
    """Write a Ray dataset as Parquet into ``folder/name``, compressed with zstd (which writes
    text about twice as fast as Parquet's default, snappy, into about half the bytes).

    Args:
        ds: The dataset.
        folder: The folder to write into.
        name: The dataset's folder in it.
        task_args: The Ray remote args of the tasks that make ``ds`` (tasks already sized to a
            file's worth of rows): each of them writes its own rows, as one file. Otherwise
            files of about ``FILE_BYTES``: Ray Data writes one file per block, and a run over
            thousands of small shards would write (and every later stage read, task by task)
            thousands of small files; but gathering blocks into files makes the write an
            operator of its own, with tasks of its own.
    """
    sizing = {"min_bytes_per_file": FILE_BYTES} if task_args is None else {}
    ds.write_parquet(
        folder.full(name),
        filesystem=folder.arrow_fs,
        compression=COMPRESSION,
        ray_remote_args=task_args,
        **sizing,
    )


def collect(ds: Any, schema: pa.Schema) -> pa.Table:
    """A (small) dataset as one table of ``schema`` in the driver (Ray Data may hand back empty
    blocks without columns)."""
    import ray

    blocks = ray.get(ds.to_arrow_refs())
    return pa.concat_tables(
        [schema.empty_table(), *(b.select(schema.names).cast(schema) for b in blocks if b.num_rows)]
    )


def to_pandas(ds: Any, columns: list[str]) -> pd.DataFrame:
    """A (small) dataset as a DataFrame, with ``columns`` also when it has no rows (Ray Data
    then returns a frame without any)."""
    frame = ds.to_pandas()
    return frame if len(frame.columns) else pd.DataFrame(columns=columns)


def cast_to(schema: pa.Schema):
    """A batch function selecting and casting a table to ``schema``."""

    def cast(table: pa.Table) -> pa.Table:
        return table.select(schema.names).cast(schema)

    return cast


def count_valid(ds: Any, column: str) -> int:
    """Non-null values of ``column`` in a dataset."""
    counts = ds.select_columns([column]).map_batches(
        lambda t: pa.table({"n": [t.num_rows - t[column].null_count]}), batch_format="pyarrow"
    )
    return int(counts.sum("n") or 0)


def read_valid(
    run: Folder, columns: list[str] | None = None, blocks: int | None = None, **read_args: Any
) -> Any:
    """The run's validated rows (``_valid/``) as a dataset: ``columns`` only (default: all), in
    about ``blocks`` blocks (default: Ray Data's choice); ``read_args`` go to ``read_parquet``."""
    import ray

    schema = (
        VALIDATED_SCHEMA
        if columns is None
        else pa.schema([VALIDATED_SCHEMA.field(name) for name in columns])
    )
    return ray.data.read_parquet(
        run.full(VALID_DIR),
        filesystem=run.arrow_fs,
        columns=columns,
        schema=schema,
        override_num_blocks=blocks,
        **read_args,
    )
