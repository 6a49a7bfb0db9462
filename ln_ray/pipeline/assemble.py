"""Assemble every input row with its scores: the run's ``_rows/``, ``scores/`` and ``rejects/``.

Only narrow columns travel here (provenance, ids, scores); the rows' text stays in ``_valid/``.

Every accepted row of ``_valid/`` is joined with the score cache (this run's scores were folded
into it); rows rejected at validation pass as they are, and every row of a trace the scoring
pass rejected (``_late/``) takes its reason. Then rows whose prompt_id names different prompts
are rejected (a selection across them would compare answers to different questions), and later
copies of a (prompt_id, teacher, response) are marked duplicates (both found by
``row_checks.py``).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ln_ray.io import storage
from ln_ray.io.cache import ScoreCache, with_bucket
from ln_ray.io.manifest import LATE_DIR, ROWS_DIR
from ln_ray.io.run_folder import RunFolder
from ln_ray.pipeline.passes import rejects_of
from ln_ray.pipeline.ray_ops import (
    cast_to,
    grouped_by_hash,
    read_valid,
    reduce_partitions,
    write_dataset,
)
from ln_ray.pipeline.row_checks import conflicting_rows, duplicate_rows
from ln_ray.schema import (
    CACHE_SCHEMA,
    LATE_REJECTS_SCHEMA,
    REJECTS_SCHEMA,
    ROW_KEY,
    ROW_META_SCHEMA,
    SCORED_ROWS_SCHEMA,
    SCORES_SCHEMA,
    SCORING_REJECTS_SCHEMA,
    padded,
    row_keys,
)


def assemble_rows(run: RunFolder, cache: ScoreCache, buckets: int | None) -> tuple[Any, int]:
    """Complete every row with its scores (not its text, which stays in ``_valid/``), mark
    duplicates, and write ``_rows/``, ``scores/`` and ``rejects/``.

    ``_valid/`` is read once, without its text, in a few large blocks (one shard per block would
    make every shuffle below cost the square of the number of input files). Every accepted row
    takes its scores from the cache, where this run's scoring put them too.

    Args:
        run: The run's folder.
        cache: The score cache.
        buckets: The cache's bucket count when every file of it is a bucket (it was folded);
            None when it may hold parts, and a trace twice.

    Returns:
        The finished rows (materialized) and the number of duplicate rows rejected.
    """
    partitions = reduce_partitions()
    meta = read_valid(run, columns=ROW_META_SCHEMA.names, blocks=partitions).materialize()
    rejected = meta.map_batches(_rejected, batch_format="pyarrow")
    accepted = meta.map_batches(_accepted, batch_format="pyarrow")
    # The scoring pass's rejects, the duplicates and the prompt ids naming different prompts
    # are applied to the rows of whole prompts (grouped by a hash of prompt_id; every row of a
    # trace has its prompt_id): nothing per row comes to the driver.
    joined = _join_cache(accepted, cache, buckets, partitions)
    if run.parquet_files(LATE_DIR):
        joined = joined.union(_scoring_rejects(run))
    finished = grouped_by_hash(joined, "prompt_id", _finish_prompts, partitions)
    rows = rejected.union(finished).materialize()
    # A few large blocks (about two per CPU): each is written as one file by the task that
    # makes it.
    write_dataset(rows, run, ROWS_DIR, task_args={})
    scores = rows.map_batches(_scores_part, batch_format="pyarrow")
    write_dataset(scores, run, "scores", task_args={})
    rejects = rows.map_batches(rejects_of, batch_format="pyarrow")
    write_dataset(rejects, run, "rejects", task_args={})
    for name, schema in (
        (ROWS_DIR, SCORED_ROWS_SCHEMA),
        ("scores", SCORES_SCHEMA),
        ("rejects", REJECTS_SCHEMA),
    ):
        run.ensure_table(name, schema)
    return rows, _count_duplicates(rows)


def is_unscored(table: pa.Table) -> pa.Array:
    """Accepted rows without scores (their trace was neither scored nor found in the cache)."""
    return pc.and_(pc.is_null(table["reject_reason"]), pc.is_null(table["n_tokens"]))


def _accepted(table: pa.Table) -> pa.Table:
    """Validated rows to complete from the cache."""
    return table.filter(pc.is_null(table["reject_reason"]))


def _rejected(table: pa.Table) -> pa.Table:
    """Rows rejected at validation, in ``SCORED_ROWS_SCHEMA`` (no scores)."""
    rows = _without_scores(table.filter(pc.is_valid(table["reject_reason"])))
    return _finish_rows(rows, LATE_REJECTS_SCHEMA.empty_table())


def _without_scores(rows: pa.Table) -> pa.Table:
    """Rows of ``ROW_META_SCHEMA`` in ``SCORED_ROWS_SCHEMA``, their scores null."""
    return padded(rows, SCORED_ROWS_SCHEMA)


def _join_cache(rows: Any, cache: ScoreCache, buckets: int | None, partitions: int) -> Any:
    """Rows (``ROW_META_SCHEMA``) with their scores from the cache, in ``SCORED_ROWS_SCHEMA``.

    A folded cache is joined bucket by bucket: the rows (narrow) are grouped by their trace's
    bucket, and each group reads its bucket's file alone, so the scores never go through a
    shuffle. A cache with parts goes through Ray Data's join, one copy of each trace kept.
    """
    files = cache.files()
    if not files:  # nothing scored yet: every accepted row must be a late reject
        return rows.map_batches(_without_scores, batch_format="pyarrow")
    if buckets is not None:
        return (
            rows.map_batches(with_bucket, fn_kwargs={"buckets": buckets}, batch_format="pyarrow")
            .groupby("bucket", num_partitions=partitions)
            .map_groups(
                _join_bucket,
                fn_kwargs={"cache": cache, "buckets": buckets},
                batch_format="pyarrow",
            )
        )
    scores = cache.dataset(files)
    # A retried batch or a duplicate row may have stored a trace twice (with equal values).
    scores = scores.groupby("trace_id", num_partitions=partitions).map_groups(
        lambda group: group.slice(0, 1), batch_format="pyarrow"
    )
    joined = rows.join(scores, "left_outer", num_partitions=partitions, on=("trace_id",))
    return joined.map_batches(cast_to(SCORED_ROWS_SCHEMA), batch_format="pyarrow")


def _join_bucket(group: pa.Table, cache: ScoreCache, buckets: int) -> pa.Table:
    """Rows of one cache bucket with their scores from its file (null where it has none)."""
    stored = cache.read_bucket(group["bucket"][0].as_py(), buckets)
    found = stored.take(pc.index_in(group["trace_id"], value_set=stored["trace_id"]))
    columns = {name: group[name] for name in ROW_META_SCHEMA.names}
    columns.update({name: found[name] for name in CACHE_SCHEMA.names if name != "trace_id"})
    return pa.table(columns).select(SCORED_ROWS_SCHEMA.names).cast(SCORED_ROWS_SCHEMA)


def _scoring_rejects(run: RunFolder) -> Any:
    """The traces the scoring pass rejected, as rows of ``SCORED_ROWS_SCHEMA`` without a
    source_file (which every input row has), so that they travel with the rows of their prompt."""
    import ray

    late = ray.data.read_parquet(
        run.full(LATE_DIR), filesystem=run.arrow_fs, schema=SCORING_REJECTS_SCHEMA
    )
    return late.map_batches(_as_rows, batch_format="pyarrow")


def _as_rows(late: pa.Table) -> pa.Table:
    named = late.rename_columns(["prompt_id", "trace_id", "reject_reason", "reject_kind"])
    return padded(named, SCORED_ROWS_SCHEMA)


def _finish_prompts(rows: pa.Table) -> pa.Table:
    """The accepted rows of whole prompts with their late rejects: the scoring pass's (the
    rows without a source_file, one per trace, ``_scoring_rejects``) first, then the prompt ids
    naming different prompts, then the duplicates."""
    late = pc.is_null(rows["source_file"])
    rejected, rows = rows.filter(late), rows.filter(pc.invert(late))
    found = [_rows_of(rejected, rows), conflicting_rows(rows), duplicate_rows(rows)]
    return _finish_rows(rows, pa.concat_tables(found))


def _rows_of(traces: pa.Table, rows: pa.Table) -> pa.Table:
    """The rows of the rejected ``traces``, with their trace's reason (``LATE_REJECTS_SCHEMA``)."""
    where = pc.index_in(rows["trace_id"], value_set=traces["trace_id"])
    table = pa.table(
        {
            **{name: rows[name] for name in ROW_KEY},
            "reason": pc.take(traces["reject_reason"], where),
            "kind": pc.take(traces["reject_kind"], where),
        }
    )
    return table.filter(pc.is_valid(where)).cast(LATE_REJECTS_SCHEMA)


def _count_duplicates(rows: Any) -> int:
    """Rows rejected as duplicates."""
    counts = rows.select_columns(["reject_kind"]).map_batches(
        lambda t: pa.table({"n": [pc.sum(pc.equal(t["reject_kind"], "duplicate")).as_py() or 0]}),
        batch_format="pyarrow",
    )
    return int(counts.sum("n") or 0)


def _finish_rows(table: pa.Table, late: pa.Table) -> pa.Table:
    reasons, kinds = table["reject_reason"], table["reject_kind"]
    if late.num_rows:
        where = pc.index_in(row_keys(table), value_set=row_keys(late))
        late_reason = pc.take(late["reason"], where)
        kinds = pc.if_else(pc.is_valid(reasons), kinds, pc.take(late["kind"], where))
        reasons = pc.coalesce(reasons, late_reason)
    reasons = storage.redact_urls_arrow(reasons)  # a shard's read error may quote its URL
    return (
        table.set_column(table.schema.get_field_index("reject_reason"), "reject_reason", reasons)
        .set_column(table.schema.get_field_index("reject_kind"), "reject_kind", kinds)
        .select(SCORED_ROWS_SCHEMA.names)
        .cast(SCORED_ROWS_SCHEMA)
    )


def _scores_part(table: pa.Table) -> pa.Table:
    return cast_to(SCORES_SCHEMA)(table.filter(pc.is_null(table["reject_reason"])))
