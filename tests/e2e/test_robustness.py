"""Nothing lost: bad input, fail-fast errors, killed actors, interrupted drivers, refreshes.

Every test runs the real job on a local Ray cluster with the tiny student.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ln_ray.config import ConfigError
from ln_ray.io import cache
from ln_ray.pipeline.job import JobError, run_score
from ln_ray.schema import CACHE_SCHEMA, METRIC_COLUMNS
from tests.helpers import (
    REPO,
    make_rows,
    parquet_with_a_corrupt_row_group,
    read_output,
    tiny_job_config,
    write_jsonl,
)

pytestmark = pytest.mark.slow


def scores_by_trace(output: str) -> pd.DataFrame:
    return read_output(output, "scores").set_index("trace_id").sort_index()


def assert_same_scores(a: str, b: str, atol: float = 1e-5) -> None:
    """The two runs published the same traces with the same scores: within ``atol``, and NaN
    (or a step with no tokens) in one only where it is in the other."""
    left, right = scores_by_trace(a), scores_by_trace(b)
    assert left.index.equals(right.index), (
        f"{len(left)} rows vs {len(right)}; traces only in the first: "
        f"{sorted(set(left.index) - set(right.index))}, only in the second: "
        f"{sorted(set(right.index) - set(left.index))}"
    )
    for column in METRIC_COLUMNS:
        x, y = left[column].to_numpy(float), right[column].to_numpy(float)
        apart = np.isnan(x) != np.isnan(y)
        assert not apart.any(), f"{column} is NaN in one run only: {list(left.index[apart])}"
        diff = np.nan_to_num(np.abs(x - y))
        assert diff.max() <= atol, f"{column} differs by {diff.max():.3g}"
    for trace_id, x, y in zip(left.index, left["step_logprobs"], right["step_logprobs"]):
        x, y = np.array(x, dtype=float), np.array(y, dtype=float)  # None: a step with no tokens
        assert np.array_equal(np.isnan(x), np.isnan(y)), f"steps without a score in {trace_id}"
        worst = np.nan_to_num(np.abs(x - y)).max(initial=0.0)
        assert worst <= atol, f"step log-probs of {trace_id} differ by {worst:.3g}"
    pd.testing.assert_frame_equal(
        read_output(a, "selections").sort_values(["prompt_id", "metric"]).reset_index(drop=True),
        read_output(b, "selections").sort_values(["prompt_id", "metric"]).reset_index(drop=True),
        check_exact=False,
        atol=atol,
    )


def test_a_trace_nan_in_one_run_only_is_a_difference(tmp_path, monkeypatch):
    scores = pd.DataFrame(
        {"trace_id": ["t1", "t2"], "step_logprobs": [[-1.0, None], [-2.0]]}
        | {m: [-1.0, -2.0] for m in METRIC_COLUMNS if m != "avg_surprisal"}
        | {"avg_surprisal": [1.0, 2.0]}
    )
    runs = {"a": scores, "b": scores.assign(galp=[-1.0, float("nan")])}
    monkeypatch.setattr(
        sys.modules[__name__], "scores_by_trace", lambda out: runs[out].set_index("trace_id")
    )
    with pytest.raises(AssertionError, match=r"galp is NaN in one run only: \['t2'\]"):
        assert_same_scores("a", "b")
    runs["b"] = scores.assign(step_logprobs=[[-1.0, -3.0], [-2.0]])
    with pytest.raises(AssertionError, match="steps without a score in t1"):
        assert_same_scores("a", "b")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 traces in a JSONL shard and a Parquet shard."""
    root = tmp_path_factory.mktemp("corpus")
    rows = make_rows(n_prompts=20, seed=3)
    write_jsonl(root / "in" / "a.jsonl", rows[:30])
    pq.write_table(pa.Table.from_pylist(rows[30:]), root / "in" / "b.parquet")
    return root / "in", rows


@pytest.fixture(scope="module")
def reference_run(ray_cluster, tiny_student_dir, corpus, tmp_path_factory):
    """An undisturbed run over the corpus."""
    out = str(tmp_path_factory.mktemp("reference") / "out")
    manifest = run_score(tiny_job_config(corpus[0], out, tiny_student_dir))
    assert manifest.counts["rows_scored"] == len(corpus[1])
    return out


def test_malformed_shards_are_rejected_row_by_row(ray_cluster, tiny_student_dir, tmp_path):
    good = {"prompt_id": "q1", "prompt": "What is 2+2?", "teacher": "t1",
            "response": "First, add two and two. So the answer is 4."}  # fmt: skip
    folder = tmp_path / "in"
    folder.mkdir()
    lines = [
        json.dumps(good).encode(),  # 1
        b"{broken",  # 2
        b'{"prompt": "caf\xe9"}',  # 3: Latin-1, not UTF-8
        json.dumps({**good, "prompt": None}).encode(),  # 4
        json.dumps({**good, "teacher": 7}).encode(),  # 5
        json.dumps({**good, "response": ""}).encode(),  # 6
        json.dumps({**good, "teacher": "t2", "steps": ["First,", " nope."]}).encode(),  # 7
        json.dumps({**good, "teacher": "t3", "response": "x " * 600}).encode(),  # 8
        json.dumps(good).encode(),  # 9: duplicate of line 1
        json.dumps({**good, "teacher": "t4", "response": "Padded answer.\n\n"}).encode(),  # 10
        b"[1, 2]",  # 11
        json.dumps({**good, "teacher": "t5"}).encode(),  # 12: fine
        json.dumps({**good, "teacher": "t7", "response": "A lone \ud800 half."}).encode(),  # 13
        b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # 14: nests too deeply
    ]
    (folder / "a.jsonl").write_bytes(codecs.BOM_UTF8 + b"\n".join(lines) + b"\n")
    pq.write_table(pa.Table.from_pylist([{**good, "teacher": "t6"}]), folder / "b.parquet")
    (folder / "c.parquet").write_bytes(b"PAR1 definitely not a parquet file PAR1")
    # rows 4-6 sit in a row group that cannot be read; rows 1-3 are scored
    grouped = [{**good, "prompt_id": f"r{i}", "teacher": "t8"} for i in range(6)]
    (folder / "d.parquet").write_bytes(parquet_with_a_corrupt_row_group(grouped))
    (folder / "notes.csv").write_text("not,input\n")
    trimming = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
        "{% endfor %}"
    )
    out = str(tmp_path / "out")
    cfg = tiny_job_config(
        folder,
        out,
        tiny_student_dir,
        "scoring.max_response_chars=1000",
        "scoring.render=conversation",  # the view in which a template can alter a response
        "output.max_reject_fraction=1",  # this input is mostly broken, on purpose
    )
    cfg.student.chat_template = trimming
    manifest = run_score(cfg)
    scores = read_output(out, "scores")
    assert sorted(scores["teacher"]) == ["t1", "t5", "t6", "t8", "t8", "t8"]
    assert sorted(scores[scores["teacher"] == "t8"]["prompt_id"]) == ["r0", "r1", "r2"]
    rejects = read_output(out, "rejects")
    a = rejects[rejects["source_file"].str.endswith("a.jsonl")].set_index("row_number")["reason"]
    assert a[2].startswith("invalid JSON")
    assert a[3] == "line is not valid UTF-8"
    assert a[4] == "missing prompt"
    assert a[5] == "teacher is not a string"
    assert a[6] == "empty response"
    assert a[7].startswith("bad steps")
    assert a[8] == "response longer than 1000 characters"
    assert a[9].startswith("duplicate of") and a[9].endswith("a.jsonl row 1")
    assert a[10].startswith("chat template alters the response text: it trims")
    assert a[11] == "line is not a JSON object"
    assert a[13] == "response is not valid Unicode"
    assert a[14] == "invalid JSON: nested too deeply"
    assert len(a) == 12
    corrupt = rejects[rejects["source_file"].str.endswith("c.parquet")]
    assert len(corrupt) == 1 and corrupt["reason"].iloc[0].startswith("cannot read Parquet shard")
    group = rejects[rejects["source_file"].str.endswith("d.parquet")]
    assert sorted(group["row_number"]) == [4, 5, 6]
    assert group["reason"].str.startswith("cannot read Parquet row group: group 2 of 2").all()

    by_file = {Path(entry["path"]).name: entry for entry in manifest.inputs}
    assert by_file["a.jsonl"]["rows_in_file"] == 14
    assert by_file["a.jsonl"]["rows_read"] == 14 == 2 + 12
    assert by_file["b.parquet"]["rows_scored"] == 1
    d = by_file["d.parquet"]
    assert (d["rows_in_file"], d["rows_scored"], d["rows_rejected"]) == (6, 3, 3)
    assert manifest.skipped_files == [str(folder / "notes.csv")]
    assert by_file["c.parquet"]["rows_in_file"] is None and "unreadable" in by_file["c.parquet"]
    for entry in manifest.inputs:
        assert entry["rows_read"] == entry["rows_scored"] + entry["rows_rejected"]
    assert manifest.counts["rows_read"] == 22
    reasons = manifest.reject_reasons
    assert reasons["duplicate"] == 1 and reasons["invalid JSON"] == 2
    assert reasons["cannot read Parquet shard"] == 1
    assert reasons["cannot read Parquet row group"] == 3 and sum(reasons.values()) == 16
    assert manifest.stages["assemble"]["duplicates"] == 1
    assert manifest.stages["read_validate"]["shard_errors"] == 1
    # t1, t5 and t6 tie and t1 wins by name; line 9 repeats line 1 and shares its trace_id,
    # yet the curated set holds one row for the prompt.
    curated = read_output(out, "curated").sort_values("prompt_id")
    assert list(zip(curated["prompt_id"], curated["teacher"])) == [
        ("q1", "t1"), ("r0", "t8"), ("r1", "t8"), ("r2", "t8"),
    ]  # fmt: skip


def test_a_run_over_its_reject_budget_fails_and_the_published_results_stay(
    ray_cluster, tiny_student_dir, tmp_path
):
    from ln_ray.pipeline.summary import format_summary
    from ln_ray.report import write_report

    out = str(tmp_path / "out")
    write_jsonl(tmp_path / "good" / "a.jsonl", make_rows(n_prompts=2))
    published = run_score(tiny_job_config(tmp_path / "good", out, tiny_student_dir))
    before = (tmp_path / "out" / "manifest.json").read_bytes()

    bad = {"prompt_id": "q1", "prompt": "What is 2+2?", "teacher": "t1", "response": ""}
    lines = [json.dumps(bad), json.dumps({**bad, "teacher": "t2"}), "{broken"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(JobError) as failed:  # validation alone rejected too many: no scoring
        run_score(tiny_job_config(tmp_path / "bad", out, tiny_student_dir))
    message = str(failed.value)
    assert (
        "did not publish: before scoring: 3 of 3 rows were rejected (100.0%, by kind: " in message
    )
    assert (
        "input 3; most common: 'empty response' 2, 'invalid JSON' 1), more than "
        "output.max_reject_fraction=0.05 allows"
    ) in message
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before  # untouched
    assert read_output(out, "scores").shape[0] == published.counts["rows_scored"]
    # The failed run's rejects stay readable, where the error says.
    where = message.split("this run's rejects are in ")[1].split(". Raise")[0]
    rejects = pq.read_table(where).to_pandas()
    assert len(rejects) == 3 and set(rejects["kind"]) == {"input"}
    failure = json.loads((Path(where).parent / "failed.json").read_text())
    assert failure["error"].startswith("before scoring: 3 of 3 rows were rejected")

    # Rejected while scoring (every prompt longer than the global cap): failed after scoring.
    too_long = r"6 of 6 rows were rejected \(100.0%, by kind: too_long 6; most common: 'prompt"
    with pytest.raises(JobError, match=too_long) as late:
        run_score(tiny_job_config(tmp_path / "good", out, tiny_student_dir, "scoring.max_tokens=4"))
    where = str(late.value).split("this run's rejects are in ")[1].split(". Raise")[0]
    assert set(pq.read_table(where).to_pandas()["reason"]) == {
        "prompt longer than scoring.max_tokens (4 tokens)"
    }
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before

    # A budget of 1 publishes even a run whose every row is rejected.
    manifest = run_score(
        tiny_job_config(tmp_path / "bad", out, tiny_student_dir, "output.max_reject_fraction=1")
    )
    assert manifest.counts["rows_read"] == 3 == manifest.counts["rows_rejected"]
    assert manifest.reject_kinds == {"input": 3}
    assert manifest.selection["prompts"] == 0
    for name in ("scores", "selections", "teachers", "curated"):
        assert read_output(out, name).empty
    assert "rows read 3: scored 0, rejected 3" in format_summary(
        manifest, read_output(out, "teachers")
    )
    page = Path(write_report(out).removeprefix("file://")).read_text()
    assert "No trace was scored" in page


def test_a_run_where_no_trace_is_eligible_still_publishes(ray_cluster, tiny_student_dir, tmp_path):
    row = {"prompt_id": "q1", "prompt": "What is 2+2?", "teacher": "t1",
           "response": "First, add two and two. So the answer is 4.", "correct": False}  # fmt: skip
    write_jsonl(tmp_path / "in" / "a.jsonl", [row, {**row, "teacher": "t2"}])
    out = str(tmp_path / "out")
    manifest = run_score(tiny_job_config(tmp_path / "in", out, tiny_student_dir))
    assert manifest.counts["rows_scored"] == 2
    assert manifest.selection["filtered_on_correct"] is True
    assert manifest.selection["prompts"] == 1 and manifest.selection["prompts_selected"] == 0
    assert read_output(out, "selections").empty and read_output(out, "curated").empty
    teachers = read_output(out, "teachers")
    assert sorted(set(teachers["teacher"])) == ["t1", "t2"]
    assert (teachers["count"] == 1).all() and (teachers["wins"] == 0).all()


def test_whole_run_problems_fail_fast(ray_cluster, tiny_student_dir, corpus, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    write_jsonl(tmp_path / "in" / "a.jsonl", make_rows(n_prompts=1))
    cases = [
        (
            tiny_job_config(tmp_path / "in", tmp_path / "in" / "out", tiny_student_dir),
            "inside input.path",
        ),
        (tiny_job_config(tmp_path / "empty", tmp_path / "o1", tiny_student_dir), "no input files"),
        (
            tiny_job_config(tmp_path / "missing", tmp_path / "o2", tiny_student_dir),
            "does not exist",
        ),
        (tiny_job_config(corpus[0], tmp_path / "a-file" / "out", tiny_student_dir), "not writable"),
        (
            tiny_job_config(corpus[0], tmp_path / "o3", str(tmp_path / "no-model")),
            "no-model': no such folder; set student.model to a local model folder",
        ),
        (
            tiny_job_config(corpus[0], tmp_path / "o4", "no-org/no-such-model"),
            r"cannot load student 'no-org/no-such-model' \(downloads are off",
        ),
    ]
    for cfg, message in cases:
        started = time.time()
        with pytest.raises(JobError, match=message):
            run_score(cfg)
        assert time.time() - started < 30
    assert not (tmp_path / "o3" / "scores").exists() and not (tmp_path / "in" / "out").exists()
    with pytest.raises(ConfigError, match="compute.token_budget"):
        tiny_job_config(corpus[0], tmp_path / "o4", tiny_student_dir, "compute.token_budget=1")


def _scoring_actor_pids() -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "ScoreStage" in cmdline:
            pids.append(proc.info["pid"])
    return pids


def test_killed_scoring_actor_is_restarted(
    ray_cluster, tiny_student_dir, corpus, reference_run, tmp_path
):
    out = str(tmp_path / "out")
    cfg = tiny_job_config(corpus[0], out, tiny_student_dir, "compute.batch_traces=1")
    result: dict = {}

    def score() -> None:
        try:
            result["manifest"] = run_score(cfg)
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    earlier = set(_scoring_actor_pids())  # actors of earlier runs that may still be exiting
    worker = threading.Thread(target=score)
    worker.start()
    cache_dir = Path(out) / "_cache"
    killed_with = None
    deadline = time.time() + 300
    while worker.is_alive() and killed_with is None and time.time() < deadline:
        done = list(cache_dir.rglob("part-*.parquet")) if cache_dir.exists() else []
        pids = [pid for pid in _scoring_actor_pids() if pid not in earlier]
        if done and pids:
            os.kill(pids[0], signal.SIGKILL)
            killed_with = len(done)
        time.sleep(0.02)
    worker.join(timeout=600)
    assert killed_with is not None and killed_with < len(corpus[1]), (
        f"not killed mid-run (cache parts at the kill: {killed_with})"
    )
    assert "manifest" in result, f"the run failed: {result.get('error')!r}"
    assert result["manifest"].counts["rows_scored"] == len(corpus[1]), result["manifest"]
    assert_same_scores(out, reference_run)


def test_interrupted_driver_resumes_where_it_stopped(
    ray_cluster, tiny_student_dir, corpus, reference_run, tmp_path
):
    import ray

    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, "jobs/score.py", f"input.path={corpus[0]}", f"output.path={out}",
         f"student.model={tiny_student_dir}", "compute.batch_traces=1",
         "output.lease_timeout_s=3"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300
    parts: list[Path] = []
    while driver.poll() is None and time.time() < deadline:
        parts = list((out / "_cache").rglob("part-*.parquet")) if (out / "_cache").exists() else []
        if len(parts) >= 3:
            driver.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    driver.wait(timeout=60)
    killed_at = time.time()
    assert 3 <= len(parts) < len(corpus[1]), "the driver was not stopped mid-run"
    assert not (out / "manifest.json").exists()  # nothing was published

    # Its lease outlives it until its heartbeat is 3 s old: a run started sooner stops at once.
    with pytest.raises(JobError, match=r"output.path is in use by run \w+ \(score"):
        run_score(tiny_job_config(corpus[0], str(out), tiny_student_dir))
    time.sleep(max(0.0, killed_at + 3.5 - time.time()))
    manifest = run_score(tiny_job_config(corpus[0], str(out), tiny_student_dir))
    scored_before = len(cache.ScoreCache(str(next((out / "_cache").iterdir()))).trace_ids())
    # the killed run's parts were folded before the lookup, which reads buckets
    assert manifest.stages["lookup_cache"]["folded_first"]["files_folded"] >= 3
    assert manifest.counts["traces_scored_now"] < len(corpus[1])
    assert scored_before == len(corpus[1])
    assert_same_scores(str(out), reference_run)
    # the killed run's folder stays until it is stale (a day unchanged), beside the published one
    left = sorted(p.name for p in (out / "_runs").iterdir())
    assert len(left) == 2 and manifest.run_id in left
    killed = next(out / "_runs" / name for name in left if name != manifest.run_id)
    assert not (killed / "manifest.json").exists()
    assert manifest.lease["broke"]["run_id"] == killed.name  # and the run said so


def _cache_is_folded(out: str, buckets: int) -> list[str]:
    """The cache holds only its buckets, one row per trace; returns the trace ids in it."""
    (key,) = os.listdir(os.path.join(out, "_cache"))
    folder = os.path.join(out, "_cache", key)
    names = sorted(os.listdir(folder))
    assert names and all(name.startswith(f"bucket-{buckets}-") for name in names), names
    assert len(names) <= buckets
    ids = pq.read_table(folder, columns=["trace_id"])["trace_id"].to_pylist()
    assert len(ids) == len(set(ids))
    return ids


def test_refresh_scores_only_new_traces(ray_cluster, tiny_student_dir, tmp_path, caplog):
    rows = make_rows(n_prompts=8, seed=11)
    folder = tmp_path / "in"
    write_jsonl(folder / "day-1.jsonl", rows[:12])
    out = str(tmp_path / "out")
    caplog.set_level(logging.INFO, logger="ln_ray")
    first = run_score(
        tiny_job_config(
            folder, out, tiny_student_dir, "output.cache_buckets=4", "compute.progress_s=0.2"
        )
    )
    assert first.counts["traces_scored_now"] == 12
    # progress lines while scoring (as many as the machine's speed allows), the final count last
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scoring: ")]
    done = [int(line.split()[1].replace(",", "")) for line in progress]
    assert done == sorted(done) and all(n <= 12 for n in done)
    assert progress[-1].startswith("scoring: 12 of 12 traces (100%)")
    model_tokens = first.stages["tokenize_score"]["model_tokens_now"]
    # The total was planned while tokenizing; the work done meets it exactly.
    assert f", {model_tokens:,} of {model_tokens:,} model tokens, " in progress[-1]
    assert len(_cache_is_folded(out, 4)) == 12
    assert first.stages["compact_cache"]["files_folded"] == 6  # one part per batch of 2
    day_one = read_output(out, "scores").set_index("trace_id").sort_index()

    write_jsonl(folder / "day-2.jsonl", rows[12:])
    second = run_score(tiny_job_config(folder, out, tiny_student_dir, "output.cache_buckets=4"))
    assert len(_cache_is_folded(out, 4)) == len(rows)
    assert second.counts["traces_scored_now"] == len(rows) - 12
    assert second.counts["rows_scored"] == len(rows)
    scored_now = second.stages["tokenize_score"]["tokens_scored_now"]
    assert 0 < scored_now < second.counts["tokens_scored"]
    # only the new rows were tokenized and sent to the scoring actors
    assert first.stages["tokenize_score"]["rows"] == 12
    assert second.stages["tokenize_score"]["rows"] == len(rows) - 12
    assert second.stages["read_validate"]["rows"] == len(rows)
    scores = read_output(out, "scores")
    assert len(scores) == len(rows)
    # day-1 rows took their scores from the cache (joined), day-2 rows from this run's scoring
    again = scores.set_index("trace_id").loc[day_one.index]
    pd.testing.assert_frame_equal(again[day_one.columns], day_one)
    selections = read_output(out, "selections")
    assert set(selections["prompt_id"]) == {row["prompt_id"] for row in rows}
    teachers = read_output(out, "teachers")
    assert teachers[teachers["metric"] == "lalp"]["count"].sum() == len(rows)

    # nothing new: nothing is tokenized, no scoring actor starts, the results stay the same
    rerun = run_score(tiny_job_config(folder, out, tiny_student_dir, "output.cache_buckets=4"))
    assert rerun.stages["tokenize_score"]["rows"] == 0
    assert rerun.stages["compact_cache"]["files_folded"] == 0
    assert len(_cache_is_folded(out, 4)) == len(rows)
    assert rerun.counts["traces_scored_now"] == 0
    assert rerun.counts["rows_scored"] == len(rows)
    pd.testing.assert_frame_equal(
        read_output(out, "scores").set_index("trace_id").sort_index(),
        scores.set_index("trace_id").sort_index(),
    )

    # another scoring setting is another cache key: everything is scored again
    third = run_score(tiny_job_config(folder, out, tiny_student_dir, "scoring.window=1"))
    assert third.counts["traces_scored_now"] == len(rows)


def test_scores_do_not_depend_on_batching_actors_or_order(
    ray_cluster, tiny_student_dir, corpus, reference_run, tmp_path
):
    folder = tmp_path / "in"
    rows = list(reversed(corpus[1]))
    write_jsonl(folder / "z-first.jsonl", rows[:25])
    pq.write_table(pa.Table.from_pylist(rows[25:]), folder / "a-second.parquet")
    out = str(tmp_path / "out")
    run_score(
        tiny_job_config(
            folder, out, tiny_student_dir,
            "compute.batch_traces=7", "compute.token_budget=4096", "compute.actors=2",
            "compute.cpus_per_actor=0.5",
        )
    )  # fmt: skip
    assert_same_scores(out, reference_run)


def test_a_trace_in_several_files_costs_model_time_once(
    ray_cluster, tiny_student_dir, tmp_path, caplog
):
    """The same rows in two files, scored a batch of two at a time: each trace is scored once
    (the progress counts the distinct traces); the second copies are duplicates, and a first
    copy's late reject is its copy's too."""
    rows = make_rows(n_prompts=2)
    rows.append({**rows[0], "prompt_id": "long", "prompt": "Puzzle: " + "what is it? " * 300})
    write_jsonl(tmp_path / "in" / "a.jsonl", rows)
    write_jsonl(tmp_path / "in" / "b.jsonl", rows)
    out = str(tmp_path / "out")
    cfg = tiny_job_config(
        tmp_path / "in",
        out,
        tiny_student_dir,
        "scoring.max_tokens=256",
        "output.max_reject_fraction=0.5",
    )
    with caplog.at_level(logging.INFO, logger="ln_ray"):
        manifest = run_score(cfg)
    distinct = len(rows) - 1  # the long prompt fills the global cap: rejected before the model
    assert f"scoring: {len(rows):,} of {len(rows):,} traces" in caplog.text
    assert manifest.counts["traces_scored_now"] == distinct
    rejects = read_output(out, "rejects").set_index(["source_file", "row_number"])["reason"]
    long_row = len(rows)
    too_long = "prompt longer than scoring.max_tokens"
    assert rejects.xs(long_row, level="row_number").str.startswith(too_long).all(), rejects
    assert len(rejects.xs(long_row, level="row_number")) == 2  # both copies, the same reason
    later = rejects[[path.endswith("b.jsonl") for path, _ in rejects.index]]
    assert len(later) == len(rows)
    assert later.drop(long_row, level="row_number").str.startswith("duplicate of").all()


def test_parts_are_merged_while_scoring_runs(ray_cluster, tmp_path):
    """While a run scores, its cache parts are merged a few at a time in Ray tasks, so that a
    run resumed after an interruption reads a few files; no trace is lost on the way."""
    store = cache.ScoreCache(str(tmp_path / "cache"))
    rows = pa.Table.from_pylist(
        [{"trace_id": f"{i:032x}", "lalp": -float(i)} for i in range(7)], schema=CACHE_SCHEMA
    )
    with store.merging(every=3, period_s=0.05) as merged:
        for i in range(7):  # as the scoring actors write them, a batch at a time
            store.write_part(rows.slice(i, 1))
        deadline = time.time() + 60
        while len(store.parts()) > 1 and time.time() < deadline:
            time.sleep(0.05)
    assert merged == {"merges": 2, "parts_merged": 6}
    assert len(store.parts()) == 1 and len(store.files()) == 3
    kept = pq.read_table([store.full(name) for name in store.files()])
    assert sorted(kept["trace_id"].to_pylist()) == rows["trace_id"].to_pylist()
