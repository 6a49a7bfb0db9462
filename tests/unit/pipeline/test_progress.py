"""The scoring progress line (ln_ray/pipeline/progress.py)."""

from __future__ import annotations


def test_progress_lines_say_how_far_and_how_long():
    from ln_ray.pipeline.progress import progress_line

    line = progress_line(250, 1000, 50_000, 100.0)
    assert line == (
        "scoring: 250 of 1,000 traces (25%), 50,000 tokens, 500 tokens/s, 1m40s elapsed, ETA 5m00s"
    )
    assert progress_line(0, 10, 0, 5.0).endswith("ETA -")
    assert "ETA 2h46m" in progress_line(1, 10_000, 10, 1.0)
