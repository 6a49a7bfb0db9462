"""The report's bounded read of a run's scores equals the whole table's figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ln_ray.report_sample import read_scores
from ln_ray.schema import padded


class _Streamed:
    """A run whose scores/ come back in small batches (as a large run's would)."""

    def __init__(self, table: pa.Table, rows: int) -> None:
        self.table, self.rows, self.reads = table, rows, 0

    def batches(self, name: str, columns: list[str], batch_rows: int, schema=None):
        assert name == "scores"
        self.reads += 1
        table = self.table if schema is None else padded(self.table, schema)
        return table.select(columns).to_batches(max_chunksize=self.rows)


def _scores(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "prompt_id": [f"p{i % 97}" for i in range(n)],
            "teacher": rng.choice(["a", "b", "c"], n),
            "trace_id": [f"{rng.integers(2**62):016x}" for _ in range(n)],
            "lalp": rng.normal(-1.5, 0.3, n),
            "lalp_drop1": rng.normal(-1.1, 0.3, n),
            "galp": rng.normal(-1.2, 0.2, n),
            "rsr": rng.uniform(0.5, 2.0, n),
            "ifd": rng.uniform(0.4, 1.1, n),
            "ifd_ppl": rng.uniform(0.1, 1.5, n),
            "correct": None,
        }
    )
    missing = min(20, n // 4)
    frame.loc[rng.choice(n, missing, replace=False), "lalp"] = np.nan  # no finite step
    frame.loc[rng.choice(n, missing, replace=False), "galp"] = None
    return frame


def _gaps(frame: pd.DataFrame, count: int) -> pd.DataFrame:
    """The z-gaps over the whole table, in pandas (what the report showed before streaming)."""
    usable = frame.dropna(subset=["lalp", "galp"])
    both = usable[["lalp", "galp"]]
    z = (both - both.mean()) / both.std(ddof=0).replace(0, 1)
    gap = z["lalp"] - z["galp"]
    return usable.assign(gap=gap).reindex(gap.abs().sort_values(ascending=False).index).head(count)


def test_streamed_scores_give_the_whole_tables_figures():
    frame = _scores(3000, seed=1)
    run = _Streamed(pa.Table.from_pandas(frame, preserve_index=False), rows=128)
    view = read_scores(run, disagreements=5, per_teacher=50)
    expected = _gaps(frame, 5)
    assert view.disagreements["trace_id"].tolist() == expected["trace_id"].tolist()
    np.testing.assert_allclose(view.disagreements["gap"], expected["gap"], rtol=1e-12)
    assert view.traces == 3000 and view.teachers == ["a", "b", "c"]
    # the sample: 50 traces a teacher, the same whatever the batches' size and order
    assert view.sample.groupby("teacher").size().tolist() == [50, 50, 50]
    shuffled = pa.Table.from_pandas(frame.sample(frac=1, random_state=2), preserve_index=False)
    again = read_scores(_Streamed(shuffled, rows=1000), disagreements=5, per_teacher=50)
    pd.testing.assert_frame_equal(view.sample, again.sample)
    rows = frame.set_index("trace_id")
    for trace in view.sample.itertuples():
        assert rows.loc[trace.trace_id, "teacher"] == trace.teacher
        assert rows.loc[trace.trace_id, "rsr"] == pytest.approx(trace.rsr)
    assert run.reads == 2  # two passes over the stream, never a table in memory


@pytest.mark.parametrize("usable", [0, 1])
def test_too_few_traces_to_measure_a_gap(usable):
    frame = _scores(4, seed=3).assign(lalp=[-1.0] * usable + [np.nan] * (4 - usable))
    view = read_scores(_Streamed(pa.Table.from_pandas(frame, preserve_index=False), 2), 5)
    assert len(view.disagreements) == usable and (view.disagreements["gap"] == 0).all()
    assert view.traces == 4


def test_scores_written_before_a_metric_existed_read_it_as_missing():
    """A run scored by an earlier ln-ray (no ifd columns) is still reported."""
    frame = _scores(200, seed=4).drop(columns=["ifd", "ifd_ppl"])
    view = read_scores(_Streamed(pa.Table.from_pandas(frame, preserve_index=False), 64), 5)
    assert view.traces == 200 and view.sample["ifd"].isna().all()
    assert view.sample["lalp"].notna().any()
