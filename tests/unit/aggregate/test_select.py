"""Per-prompt selection (ln_ray/aggregate/select.py) on hand-made tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from ln_ray.aggregate.select import (
    CANDIDATE_COLUMNS,
    HIGHER_IS_BETTER,
    merge_selections,
    partial_selections,
    select_traces,
)


def _prompt(rows):
    """Candidates given as (prompt, teacher, trace, correct, lalp, galp, rsr); lalp_drop1 is
    their lalp, and ifd and ifd_ppl their rsr (lower is better for each)."""
    copied = {"lalp_drop1": "lalp", "ifd": "rsr", "ifd_ppl": "rsr"}
    columns = [c for c in CANDIDATE_COLUMNS if c not in copied]
    frame = pd.DataFrame(rows, columns=columns)
    for name, source in copied.items():
        frame[name] = frame[source]
    return pa.Table.from_pandas(frame[CANDIDATE_COLUMNS], preserve_index=False)


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
    assert picked.loc["lalp", "teacher"] == picked.loc["lalp_drop1", "teacher"] == "a"
    assert picked.loc["galp", "teacher"] == "c"
    assert picked.loc["rsr", "teacher"] == picked.loc["ifd", "teacher"] == "c"
    assert picked.loc["ifd_ppl", "teacher"] == "c"
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
                "lalp_drop1": float(rng.choice([value, -1.0, np.nan, rng.normal()])),
                "galp": float(rng.choice([-1.0, rng.normal()])),
                "rsr": float(rng.choice([3.0, np.nan, abs(rng.normal())])),
                "ifd": float(rng.choice([0.5, np.nan, abs(rng.normal())])),
                "ifd_ppl": float(rng.choice([0.5, 1.2, np.inf, abs(rng.normal())])),
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
    assert picked["metric"].tolist() == ["lalp", "lalp_drop1"]
