"""Selection, teacher statistics and curation on hand-made tables (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ln_ray.aggregate.curate import (
    curate_batch,
    curated_schema,
    extra_schema,
    extra_types,
    keep_selected,
)
from ln_ray.aggregate.select import (
    CANDIDATE_COLUMNS,
    HIGHER_IS_BETTER,
    merge_selections,
    partial_selections,
    select_traces,
)
from ln_ray.aggregate.teachers import count_wins, rank_teachers, teacher_stats


def _prompt(rows):
    return pa.Table.from_pandas(pd.DataFrame(rows, columns=CANDIDATE_COLUMNS), preserve_index=False)


def select_prompt(table, *, filter_correct):
    return select_traces(table, filter_correct=filter_correct).to_pandas()


def test_select_argmax_argmin_with_correct_filter():
    group = _prompt(
        [
            ("p", "a", "t1", True, -1.0, -2.0, 3.0),
            ("p", "b", "t2", False, -0.5, -1.0, 1.0),  # best everywhere, but incorrect
            ("p", "c", "t3", True, -2.0, -1.5, 2.5),
        ]
    )
    picked = select_prompt(group, filter_correct=True).set_index("metric")
    assert picked.loc["lalp", "teacher"] == "a"
    assert picked.loc["galp", "teacher"] == "c"
    assert picked.loc["rsr", "teacher"] == "c"
    assert (picked["n_candidates"] == 2).all()
    unfiltered = select_prompt(group, filter_correct=False).set_index("metric")
    assert set(unfiltered["teacher"]) == {"b"}


def test_select_ties_break_by_teacher_then_trace_id():
    group = _prompt(
        [
            ("p", "zeta", "t0", None, -1.0, -1.0, 2.0),
            ("p", "alpha", "t9", None, -1.0, -1.0, 2.0),
            ("p", "alpha", "t3", None, -1.0, -1.0, 2.0),
        ]
    )
    picked = select_prompt(group, filter_correct=False)
    assert set(zip(picked["teacher"], picked["trace_id"])) == {("alpha", "t3")}


def _by_loop(rows: list[dict], filter_correct: bool) -> dict:
    """Selections computed one prompt and one metric at a time, in plain Python."""
    picked = {}
    for prompt in {r["prompt_id"] for r in rows}:
        for metric, higher in HIGHER_IS_BETTER.items():
            candidates = [
                r
                for r in rows
                if r["prompt_id"] == prompt
                and (r["correct"] or not filter_correct)
                and r[metric] is not None
                and np.isfinite(r[metric])
            ]
            if candidates:
                best = min(
                    candidates,
                    key=lambda r: (
                        -r[metric] if higher else r[metric],
                        r["teacher"],
                        r["trace_id"],
                    ),
                )
                picked[(prompt, metric)] = (best["teacher"], best["trace_id"], len(candidates))
    return picked


def test_selection_over_many_prompts_matches_a_loop_and_merges_over_any_split():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):
        value = float(rng.choice([-1.0, -2.0, np.nan, np.inf, rng.normal()]))
        rows.append(
            {
                "prompt_id": f"p{rng.integers(40)}",
                "teacher": f"t{rng.integers(5)}",
                "trace_id": f"{i:04d}",
                "correct": bool(rng.integers(2)) if i % 7 else None,
                "lalp": value,
                "galp": float(rng.choice([-1.0, rng.normal()])),
                "rsr": float(rng.choice([3.0, np.nan, abs(rng.normal())])),
            }
        )
    table = pa.Table.from_pylist(rows)
    for filter_correct in (True, False):
        whole = select_traces(table, filter_correct=filter_correct)
        got = {
            (r["prompt_id"], r["metric"]): (r["teacher"], r["trace_id"], r["n_candidates"])
            for r in whole.to_pylist()
        }
        assert got == _by_loop(rows, filter_correct)
        # selecting in blocks (any split, in any order) and merging gives the same table
        order = rng.permutation(len(rows))
        blocks = [table.take(order[i : i + 37]) for i in range(0, len(rows), 37)]
        partials = [partial_selections(b, filter_correct=filter_correct) for b in blocks]
        merged = merge_selections(pa.concat_tables(partials[::-1]))
        assert merged.equals(whole)


def test_select_skips_nan_and_prompts_without_candidates():
    group = _prompt([("p", "a", "t1", False, -1.0, np.nan, np.nan)])
    assert select_prompt(group, filter_correct=True).empty
    picked = select_prompt(group, filter_correct=False)
    assert picked["metric"].tolist() == ["lalp"]


def _teacher(name, lalp, rank=None, surprisal=None):
    n = len(lalp)
    return pd.DataFrame(
        {
            "teacher": [name] * n,
            "lalp": lalp,
            "galp": lalp,
            "lalp_token": lalp,
            "rsr": np.asarray(rank or [2.0] * n) / np.asarray(surprisal or [1.0] * n),
            "avg_rank": rank or [2.0] * n,
            "avg_surprisal": surprisal or [1.0] * n,
        }
    )


def test_teacher_stats_mean_ci_and_dataset_rsr():
    def stats_of(lalp, rank, surprisal):
        return teacher_stats(
            _teacher("a", lalp, rank=rank, surprisal=surprisal),
            samples=2000,
            confidence=0.9,
            seed=0,
        )

    stats = stats_of([-1.0, -2.0, -3.0, -2.0], [2, 4, 6, 8], [1, 1, 2, 4]).set_index("metric")
    assert stats.loc["lalp", "mean"] == pytest.approx(-2.0)
    assert stats.loc["lalp", "ci_low"] <= -2.0 <= stats.loc["lalp", "ci_high"]
    assert stats.loc["lalp", "ci_low"] >= -3.0 and stats.loc["lalp", "ci_high"] <= -1.0
    assert stats.loc["rsr_dataset", "mean"] == pytest.approx(20 / 8)
    assert stats.loc["rsr", "mean"] == pytest.approx(np.mean([2, 4, 3, 2]))
    assert (stats["count"] == 4).all()
    again = stats_of([-1.0, -2.0, -3.0, -2.0], [2, 4, 6, 8], [1, 1, 2, 4])
    pd.testing.assert_frame_equal(stats.reset_index()[again.columns], again)
    # the same rows in another order give the same intervals
    shuffled = stats_of([-2.0, -3.0, -1.0, -2.0], [8, 6, 2, 4], [4, 2, 1, 1])
    pd.testing.assert_frame_equal(stats.reset_index()[shuffled.columns], shuffled)


def test_rank_teachers_orders_by_direction_and_counts_wins():
    stats = pd.concat(
        [
            teacher_stats(
                _teacher("a", [-1.0, -1.2], rank=[9, 9]), samples=50, confidence=0.95, seed=1
            ),
            teacher_stats(
                _teacher("b", [-2.0, -2.2], rank=[1, 1]), samples=50, confidence=0.95, seed=1
            ),
        ]
    )
    selections = pd.DataFrame(
        {"metric": ["lalp", "lalp", "rsr"], "teacher": ["a", "a", "b"], "trace_id": ["x", "y", "z"]}
    )
    table = rank_teachers(stats, count_wins(selections)).set_index(["metric", "teacher"])
    assert table.loc[("lalp", "a"), "rank"] == 1 and table.loc[("lalp", "b"), "rank"] == 2
    assert table.loc[("rsr", "b"), "rank"] == 1  # lower is better
    assert table.loc[("lalp", "a"), "wins"] == 2 and table.loc[("lalp", "b"), "wins"] == 0
    assert table.loc[("rsr_dataset", "b"), "wins"] == 1


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
