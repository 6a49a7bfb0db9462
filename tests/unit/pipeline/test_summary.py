"""The summary's overview (ln_ray/pipeline/summary.py): every teacher's rank by every metric,
the neighbours told apart, and the selections' agreement."""

from __future__ import annotations

import pandas as pd

from ln_ray.pipeline.summary import agreement_shares, format_overview, overview


def _table() -> pd.DataFrame:
    rows = []
    for metric, order, apart in (
        ("lalp", ["b", "a", "c"], [True, False, None]),
        ("galp", ["a", "b", "c"], [False, True, None]),
        ("rsr", ["c", "a", "b"], [None, None, None]),
    ):
        for rank, (teacher, told) in enumerate(zip(order, apart), start=1):
            rows.append(
                {"metric": metric, "teacher": teacher, "rank": rank, "separated_from_next": told}
            )
    return pd.DataFrame(rows)


def test_the_overview_ranks_every_teacher_by_every_metric():
    cells = overview(_table())
    assert list(cells.index) == ["b", "a", "c"]  # in their order by lalp
    assert list(cells.columns) == ["lalp", "galp", "rsr"]
    assert cells.loc["b"].tolist() == ["1 >", "2 >", "3"]
    assert cells.loc["a"].tolist() == ["2", "1", "2"]
    assert cells.loc["c"].tolist() == ["3", "3", "1"]
    counts = [
        {"metric": "lalp", "other": "galp", "same": 3, "prompts": 4},
        {"metric": "galp", "other": "lalp", "same": 3, "prompts": 4},
        {"metric": "galp", "other": "rsr", "same": 1, "prompts": 4},
        {"metric": "rsr", "other": "rsr", "same": 4, "prompts": 4},
    ]
    assert agreement_shares(counts) == [("galp", "lalp", 0.75), ("galp", "rsr", 0.25)]
    text = format_overview(_table(), counts)
    assert text.splitlines()[1:5] == [
        "  teacher  lalp  galp  rsr",
        "  b        1 >   2 >   3",
        "  a        2     1     2",
        "  c        3     3     1",
    ]
    assert text.endswith("galp and lalp 75%, galp and rsr 25%\n")
    assert format_overview(_table().iloc[0:0], None).startswith("Overview: no teacher")
