"""The scoring progress (ln_ray/pipeline/progress.py) and the run's status line
(ln_ray/pipeline/display.py)."""

from __future__ import annotations

import io

from ln_ray.pipeline.display import CLEAR, RunStatus
from ln_ray.pipeline.progress import Progress, ProgressCounter, progress_line, status_text


def test_progress_lines_say_how_far_and_how_long_in_model_tokens():
    line = progress_line(Progress(250, 50_000, 1000, 200_000), 1000, 100.0)
    assert line == (
        "scoring: 250 of 1,000 traces (25%), 50,000 of 200,000 model tokens, 500 tokens/s, "
        "1m40s elapsed, ETA 5m00s"
    )
    # Before any batch ends, the packs done give the rate: an ETA in the first seconds.
    early = progress_line(Progress(0, 10_000, 1000, 200_000), 1000, 20.0)
    assert early.startswith("scoring: 0 of 1,000 traces (0%), 10,000 of 200,000 model tokens")
    assert early.endswith("ETA 6m20s")
    # While tokenizing goes on, the total is estimated from the traces tokenized so far.
    partial = progress_line(Progress(0, 0, 100, 20_000), 1000, 5.0)
    assert "0 of about 200,000 model tokens" in partial and partial.endswith("ETA -")
    assert progress_line(Progress(0, 0, 0, 0), 10, 5.0).endswith(
        "0 model tokens, 0 tokens/s, 0m05s elapsed, ETA -"
    )
    assert progress_line(Progress(10, 900, 10, 900), 10, 3.0).endswith("0m03s elapsed, done")
    assert "ETA 2h46m" in progress_line(Progress(1, 10, 10_000, 100_000), 10_000, 1.0)


def test_the_status_line_says_the_same_in_short():
    assert status_text(Progress(250, 50_000, 1000, 200_000), 1000, 100.0) == (
        "250/1,000 traces, 50,000/200,000 model tokens (25%), 500 tokens/s, ETA 5m00s"
    )
    assert "0/~200,000 model tokens (0%)" in status_text(Progress(0, 0, 100, 20_000), 1000, 5.0)
    assert status_text(Progress(), 10, 1.0) == "0/10 traces, 0 model tokens, 0 tokens/s, ETA -"


def test_the_counter_holds_each_actors_batch_in_flight_once():
    counter = ProgressCounter()
    counter.plan(4, 400)
    counter.packs("a", 50)
    counter.packs("a", 120)  # the batch's tokens so far, not an increment
    counter.packs("b", 30)
    assert counter.snapshot() == Progress(0, 150, 4, 400)
    counter.add(2, 200, "a")  # a's batch ended: its own count replaces its packs
    assert counter.snapshot() == Progress(2, 230, 4, 400)
    counter.packs("b", 10)  # b restarted (same actor id): its batch from the start
    assert counter.snapshot() == Progress(2, 210, 4, 400)


def test_the_status_line_is_redrawn_below_what_is_printed():
    screen = io.StringIO()
    status = RunStatus(screen, live=True)
    status.stage("tokenize_score")
    status.detail("3/10 traces, 900/3,000 model tokens (30%), 100 tokens/s, ETA 0m21s")
    status.write_above("INFO ln_ray: a log line\n")
    status.close()
    text = screen.getvalue()
    assert text.startswith(CLEAR + "ln-ray | tokenize_score 0m00s")
    shown = CLEAR + "ln-ray | tokenize_score 0m00s | 3/10 traces, 900/3,000 model tokens (30%)"
    assert shown in text
    # the line is erased, the log line printed, and the line drawn again; erased at the end
    after = text.split("INFO ln_ray: a log line\n")
    assert after[0].endswith(CLEAR) and after[1].startswith(shown) and after[1].endswith(CLEAR)
    quiet = io.StringIO()
    silent = RunStatus(quiet, live=False)
    silent.stage("reduce")
    silent.detail("anything")
    assert quiet.getvalue() == "" and silent.progress_output(30.0) == {"interval": 30.0}
    assert status.progress_output(30.0)["interval"] == 1.0
