"""The run's accounting (ln_ray/pipeline/accounting.py): nothing missing or unproven, and a
budget for rejects."""

from __future__ import annotations

import pytest
from fsspec.implementations.local import LocalFileSystem

from ln_ray.io.storage import Inputs
from ln_ray.pipeline.accounting import (
    PER_FILE,
    AccountingError,
    RejectBudgetError,
    check_inputs,
    check_reject_budget,
)

FILES = Inputs(
    LocalFileSystem(), [("in/a.jsonl", "jsonl"), ("in/b.parquet", "parquet")], skipped=[]
)


def _counts(
    scored: int, rejected: int, shard_errors: int = 0, input_rows: int | None = None
) -> dict[str, int]:
    return {
        **dict.fromkeys(PER_FILE, 0),
        "rows_scored": scored,
        "rows_rejected": rejected,
        "input_rows": scored + rejected if input_rows is None else input_rows,
        "shard_errors": shard_errors,
    }


def test_every_row_is_accounted_for_per_file():
    per_file = {"in/a.jsonl": _counts(3, 1), "in/b.parquet": _counts(0, 1, shard_errors=1)}
    unreadable = {"rows_in_file": None, "unreadable": "ArrowInvalid: bad footer"}
    inputs = check_inputs(FILES, per_file, [{"rows_in_file": 4}, unreadable])
    assert [entry["rows_read"] for entry in inputs] == [4, 1]
    with pytest.raises(AccountingError, match=r"in/a.jsonl: 5 rows in the file, 4 read"):
        check_inputs(FILES, per_file, [{"rows_in_file": 5}, unreadable])


def test_a_per_prompt_file_is_checked_by_its_rows_and_counted_by_its_traces():
    """Two rows of four responses each: eight traces read, two input rows counted."""
    per_file = {"in/a.jsonl": _counts(7, 1, input_rows=2), "in/b.parquet": _counts(0, 0)}
    inputs = check_inputs(FILES, per_file, [{"rows_in_file": 2}, {"rows_in_file": 0}])
    assert (inputs[0]["rows_read"], inputs[0]["input_rows"]) == (8, 2)
    with pytest.raises(AccountingError, match=r"in/a.jsonl: 3 rows in the file, 2 read"):
        check_inputs(FILES, per_file, [{"rows_in_file": 3}, {"rows_in_file": 0}])


def test_a_file_the_independent_count_could_not_read_but_the_pipeline_did_fails_the_run():
    """The count's read failed (a transient error), the pipeline's did not: nothing proves
    that the rows read are all the rows."""
    per_file = {"in/a.jsonl": _counts(3, 1), "in/b.parquet": _counts(2, 0)}
    failed = {"rows_in_file": None, "unreadable": "OSError: connection reset"}
    with pytest.raises(AccountingError, match=r"in/b.parquet: the independent row count could"):
        check_inputs(FILES, per_file, [{"rows_in_file": 4}, failed])


def test_a_run_over_its_reject_budget_fails_with_the_rejects_by_kind():
    check_reject_budget(100, {"input": 3, "render": 2}, 0.05)  # 5%: within
    check_reject_budget(100, {"duplicate": 40, "input": 1}, 0.05)  # duplicates do not count
    check_reject_budget(0, {}, 0.0)  # an empty input
    with pytest.raises(RejectBudgetError) as failed:
        check_reject_budget(100, {"out_of_memory": 4, "input": 2, "duplicate": 9}, 0.05)
    assert str(failed.value) == (
        "6 of 100 rows were rejected (6.0%, by kind: duplicate 9, input 2, out_of_memory 4), "
        "more than output.max_reject_fraction=0.05 allows"
    )
