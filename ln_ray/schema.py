"""Column names and Arrow types of every table ln-ray reads or writes, declared once.

Stages check their input columns against these at start (``require_columns``) and the writers cast
to them, so a renamed or missing column fails loudly where it first matters.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

# Where a row came from: its file, its 1-based row there, and (input.layout=per_prompt) its
# response's index in that row's list (null when a row is one trace). The three are its row key.
_PROVENANCE = [("source_file", pa.string()), ("row_number", pa.int64()), ("item", pa.int32())]
ROW_KEY = tuple(name for name, _ in _PROVENANCE)
# What identifies a trace on its way from validation to the outputs.
_TRACE = [
    ("trace_id", pa.string()),
    ("prompt_id", pa.string()),
    ("teacher", pa.string()),
    ("correct", pa.bool_()),
]
# A row's text, stored once (in the run's _valid/) and joined back only where it is needed (the
# curated set, the report's examples): ``messages`` holds the conversation (as scored) as JSON
# text and ``extra`` every other input column as JSON, so shards with different extra columns
# still share one schema.
TEXT_COLUMNS = ("messages", "extra")
# The steps' lengths in characters (they partition the response).
_STEP_CHARS = ("step_chars", pa.list_(pa.int32()))

METRIC_COLUMNS = (
    *("galp", "lalp", "lalp_drop1", "lalp_token", "ifd", "ifd_ppl"),
    *("rsr", "avg_rank", "avg_surprisal"),
)
_SCORES = [
    ("n_tokens", pa.int64()),
    ("n_steps", pa.int64()),
    *[(name, pa.float64()) for name in METRIC_COLUMNS],
    ("truncated", pa.bool_()),
    ("step_logprobs", pa.list_(pa.float64())),
]

# Rows as the reader hands them on: the user's columns mapped to canonical names, provenance, and
# ``read_error`` for a line or value that could not be read.
RAW_SCHEMA = pa.schema(
    [
        *_PROVENANCE,
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("teacher", pa.string()),
        ("response", pa.string()),
        ("reasoning", pa.string()),
        ("steps", pa.list_(pa.string())),
        ("correct", pa.bool_()),
        ("messages", pa.string()),
        ("system", pa.string()),
        ("extra", pa.string()),
        ("read_error", pa.string()),
    ]
)

# What kind of problem rejected a row (rejects/'s ``kind``): the input itself (unreadable,
# invalid, or a prompt_id shared by different prompts), a conversation the student's template
# cannot render, a trace too long to score, one that ran out of device memory even alone, an
# error while scoring; and a duplicate, whose trace is scored through its first copy (the only
# kind that ``output.max_reject_fraction`` does not count).
REJECT_KINDS = ("input", "render", "too_long", "out_of_memory", "scoring_error", "duplicate")
_REJECT = [("reject_reason", pa.string()), ("reject_kind", pa.string())]
# The reason's first part for rows whose prompt_id also names another prompt.
SHARED_PROMPT_ID = "prompt_id shared by different prompts"


def reason_kinds(reasons: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Reject reasons without their particulars (each one's text up to its first colon), so
    that the rejects of one cause count together; every duplicate as ``duplicate``; null where
    the row is accepted."""
    head = pc.list_element(pc.split_pattern(reasons, ":", max_splits=1), 0)
    duplicate = pc.starts_with(reasons, "duplicate of")
    return pc.if_else(duplicate, pa.scalar("duplicate", pa.string()), head)


# A row's own columns, without scores or text: what travels through scoring, the join with the
# score cache and the shuffles. Rejected rows carry only provenance, ``reject_reason`` and
# ``reject_kind``; ``dup_key`` identifies (prompt_id, teacher, response) for de-duplication and
# ``context_key`` the conversation before the response (one prompt_id, one context).
ROW_META_SCHEMA = pa.schema(
    [
        *_PROVENANCE,
        *_TRACE,
        ("dup_key", pa.string()),
        ("context_key", pa.string()),
        *_REJECT,
    ]
)

# Every input row after validation, before any tokenizing: its own columns, its text, the given
# steps' lengths (null where the segmenter will cut them). The run keeps it as _valid/, the one
# copy of the rows' text.
VALIDATED_SCHEMA = pa.schema(
    [*ROW_META_SCHEMA, *[(name, pa.string()) for name in TEXT_COLUMNS], _STEP_CHARS]
)

# The accepted rows whose trace the score cache does not hold (the run's _new/), sorted by the
# _valid/ file that holds them: each new trace's first copy (smallest source_file, row_number)
# is scored (status "score"); the others repeat it (status "repeat", with the first copy's
# source_file and row_number), take its scores and never cost model time.
NEW_ROWS_SCHEMA = pa.schema(
    [
        ("valid_file", pa.string()),
        *_PROVENANCE,
        ("status", pa.string()),
        ("first_file", pa.string()),
        ("first_row", pa.int64()),
        ("first_item", pa.int32()),
    ]
)

# A new trace prepared for the scoring actors: its steps and tokens.
PREPARED_SCHEMA = pa.schema(
    [
        *ROW_META_SCHEMA,
        _STEP_CHARS,
        ("input_ids", pa.list_(pa.int32())),
        ("prefix_len", pa.int32()),
        ("step_bounds", pa.list_(pa.int32())),
    ]
)

# The score cache: one row per scored trace, keyed by trace_id, under a key of the student's
# identity and the scoring settings, so a re-run or a refresh scores only what is new. It keeps
# the steps' lengths too: a cached trace is never segmented again.
CACHE_SCHEMA = pa.schema(
    [("trace_id", pa.string()), *_SCORES, ("model_tokens", pa.int64()), _STEP_CHARS]
)

# Every input row with its scores, scored or rejected, without its text: what the scoring actors
# hand on, and the run's working table (_rows/), split into scores/ and rejects/.
SCORED_ROWS_SCHEMA = pa.schema(
    [*ROW_META_SCHEMA, *[f for f in CACHE_SCHEMA if f.name != "trace_id"]]
)

# scores/: one row per scored trace (DESIGN.md, output contract). ``correct`` is null when the
# input has no such column.
SCORES_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("teacher", pa.string()),
        ("trace_id", pa.string()),
        *_SCORES,
        ("correct", pa.bool_()),
    ]
)

# Traces the scoring pass rejected (a template that cannot render, a trace too long, a scoring
# failure), by trace: the scoring actors write these to the run's _late/ (their scores go to the
# cache), and the assemble stage gives each reason to every row of the trace.
SCORING_REJECTS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("trace_id", pa.string()),
        ("reason", pa.string()),
        ("kind", pa.string()),
    ]
)

# Rows rejected after validation (a scoring reject, a prompt id naming two prompts, a duplicate),
# by row key.
LATE_REJECTS_SCHEMA = pa.schema(
    [
        *_PROVENANCE,
        ("reason", pa.string()),
        ("kind", pa.string()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        *_PROVENANCE,
        ("prompt_id", pa.string()),
        ("teacher", pa.string()),
        ("reason", pa.string()),
        ("kind", pa.string()),
    ]
)

SELECTIONS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("metric", pa.string()),
        ("teacher", pa.string()),
        ("trace_id", pa.string()),
        ("score", pa.float64()),
        ("n_candidates", pa.int64()),
    ]
)

# The metrics the teacher table ranks, and whether higher is better for each. rsr_dataset is
# sum(avg_rank) / sum(avg_surprisal) over a teacher's traces; the others are per-trace means.
TEACHER_METRICS = {
    "lalp": True,
    "galp": True,
    "lalp_drop1": True,
    "lalp_token": True,
    "ifd": False,
    "ifd_ppl": False,
    "rsr": False,
    "rsr_dataset": False,
    "avg_rank": False,
    "avg_surprisal": False,
}


# The metrics a trace is selected by (selections/); ``selection.curate_by`` names the one
# whose picks make the curated set.
SELECTED_BY = ("lalp", "lalp_drop1", "galp", "rsr", "ifd", "ifd_ppl")


def better_direction(metric: str) -> str:
    """``higher`` or ``lower``: which way is better for a ``TEACHER_METRICS`` metric."""
    return "higher" if TEACHER_METRICS.get(metric, False) else "lower"


# ``wins`` is null for a metric no selection is made on; ``separated_from_next`` says whether
# the paired comparison with the next teacher in rank excludes a tie (teacher_pairs/), null for
# the last teacher.
TEACHERS_SCHEMA = pa.schema(
    [
        ("teacher", pa.string()),
        ("metric", pa.string()),
        ("better", pa.string()),
        ("mean", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("count", pa.int64()),
        ("wins", pa.int64()),
        ("rank", pa.int64()),
        ("separated_from_next", pa.bool_()),
    ]
)

# teacher_pairs/: every ordered pair of teachers on every metric, over the prompts both
# answered (ln_ray/aggregate/pairs.py).
TEACHER_PAIRS_SCHEMA = pa.schema(
    [
        ("teacher_a", pa.string()),
        ("teacher_b", pa.string()),
        ("metric", pa.string()),
        ("mean_diff", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("win_rate", pa.float64()),
        ("n_prompts", pa.int64()),
        ("separated", pa.bool_()),
    ]
)

# teacher_stability/: how often the ranking on random subsets of n prompts equals the full
# ranking, and the mean Kendall's tau between them (ln_ray/aggregate/stability.py).
TEACHER_STABILITY_SCHEMA = pa.schema(
    [
        ("metric", pa.string()),
        ("n_prompts", pa.int64()),
        ("agreement", pa.float64()),
        ("kendall_tau", pa.float64()),
    ]
)


# curated/: each prompt's selected trace as chat messages, then every other input column (their
# types are unified over the selected rows: ln_ray/aggregate/curate.py).
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
# ... or, with output.messages_format=sharegpt, as ShareGPT conversations.
SHAREGPT_TYPE = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
MESSAGES_FORMATS = ("openai", "sharegpt")
CURATED_BASE = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("teacher", pa.string()),
        ("trace_id", pa.string()),
        ("correct", pa.bool_()),
        ("lalp", pa.float64()),
        ("messages", MESSAGE_TYPE),
    ]
)


def curated_base(messages_format: str = "openai") -> pa.Schema:
    """``CURATED_BASE`` with its conversation in ``messages_format``: OpenAI-style
    ``messages``, or ShareGPT-style ``conversations``."""
    if messages_format == "sharegpt":
        where = CURATED_BASE.get_field_index("messages")
        return CURATED_BASE.set(where, pa.field("conversations", SHAREGPT_TYPE))
    return CURATED_BASE


def row_keys(table: pa.Table) -> pa.Array:
    """``source_file``, ``row_number`` and ``item`` as one text key (null where the row number
    is)."""
    item = pc.fill_null(pc.cast(table["item"], pa.string()), "")
    return pc.binary_join_element_wise(
        table["source_file"], pc.cast(table["row_number"], pa.string()), item, "\x00"
    )


def row_place(file: pa.Array, row: pa.Array, item: pa.Array) -> pa.Array:
    """Where rows are, as a person reads it: ``FILE row N`` (``FILE row N item I`` for a
    response of a per_prompt row)."""
    place = pc.binary_join_element_wise(file, pc.cast(row, pa.string()), " row ")
    items = pc.binary_join_element_wise(place, pc.cast(item, pa.string()), " item ")
    return pc.coalesce(items, place)


def padded(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``: its columns by name, cast; the columns it lacks, null."""
    return pa.table(
        {
            field.name: table[field.name]
            if field.name in table.column_names
            else pa.nulls(table.num_rows, field.type)
            for field in schema
        }
    ).cast(schema)


def require_columns(present: Iterable[str], required: Iterable[str], stage: str) -> None:
    """Fail loudly when a stage's input lacks columns it needs.

    Raises:
        KeyError: Naming the stage and the missing columns.
    """
    missing = sorted(set(required) - set(present))
    if missing:
        raise KeyError(f"{stage}: input is missing columns {missing}")
