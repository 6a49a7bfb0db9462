"""The curated SFT set (ln_ray/aggregate/curate.py): selected rows back to typed records."""

from __future__ import annotations

import json

import pyarrow as pa

from ln_ray.aggregate.curate import (
    curate_batch,
    curated_schema,
    extra_schema,
    extra_types,
    keep_selected,
)


def test_keep_selected_drops_rejected_copies_of_a_selected_trace():
    rows = pa.table(
        {
            "trace_id": ["t1", "t2", "t1", None],
            "row_number": [1, 2, 3, 4],
            "reject_reason": [None, None, "duplicate of a.jsonl row 1", "empty response"],
        }
    )
    kept = keep_selected(rows, pa.array(["t1"]))
    assert kept["row_number"].to_pylist() == [1]


def test_curate_restores_messages_and_typed_extra_columns():
    rows = pa.table(
        {
            "prompt_id": ["p1", "p2"],
            "teacher": ["a", "b"],
            "trace_id": ["t1", "t2"],
            "correct": [True, None],
            "lalp": [-1.0, -2.0],
            "messages": [
                json.dumps(
                    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
                ),
                json.dumps(
                    [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
                ),
            ],
            "extra": [json.dumps({"source": "x", "n": 1, "tags": ["k"]}), json.dumps({"n": 2.5})],
        }
    )
    pairs = [(r["column"], r["kind"]) for r in extra_types(rows).to_pylist()]
    schema = curated_schema(extra_schema(pairs))
    out = curate_batch(rows, schema=schema).to_pylist()
    assert out[0]["messages"][1] == {"role": "assistant", "content": "A1"}
    assert out[0]["source"] == "x" and out[1]["source"] is None
    assert out[1]["n"] == 2.5 and schema.field("n").type == pa.float64()
    assert out[0]["tags"] == '["k"]'  # non-scalar extras travel as JSON text


def test_curate_keeps_input_columns_named_like_its_own():
    extra = {"trace_id": "mine-17", "input_trace_id": "x", "lalp": "note", "source": "gsm8k"}
    rows = pa.table(
        {
            "prompt_id": ["p1"],
            "teacher": ["a"],
            "trace_id": ["t1"],
            "correct": [None],
            "lalp": [-1.0],
            "messages": [json.dumps([{"role": "user", "content": "Q"}])],
            "extra": [json.dumps(extra)],
        }
    )
    pairs = [(r["column"], r["kind"]) for r in extra_types(rows).to_pylist()]
    (out,) = curate_batch(rows, schema=curated_schema(extra_schema(pairs))).to_pylist()
    assert (out["trace_id"], out["lalp"]) == ("t1", -1.0)
    assert out["input_trace_id"] == "mine-17" and out["input_input_trace_id"] == "x"
    assert out["input_lalp"] == "note" and out["source"] == "gsm8k"
