"""The Ray Data job end to end on a real local Ray cluster: local files and S3 (moto, loopback)."""

from __future__ import annotations

import json
import random

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ln_ray.config import ComputeConfig, load_config
from ln_ray.pipeline.job import run_score, run_select
from ln_ray.pipeline.ray_ops import connect_ray
from ln_ray.pipeline.summary import format_summary
from ln_ray.schema import SELECTED_BY, TEACHER_METRICS, better_direction
from tests.helpers import TEACHERS, make_rows, read_output
from tests.templates import R1_DISTILL

pytestmark = pytest.mark.slow


def write_shards(fs, root: str, rows: list[dict]) -> list[str]:
    """Half the rows as JSONL (plus two bad lines), half as Parquet."""
    half = len(rows) // 2
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/part-0.jsonl", "wb") as handle:
        for row in rows[:half]:
            handle.write((json.dumps(row) + "\n").encode())
        handle.write(b"{not json\n")
        handle.write(json.dumps({**rows[0], "response": ""}).encode() + b"\n")
    with fs.open(f"{root}/part-1.parquet", "wb") as handle:
        pq.write_table(pa.Table.from_pylist(rows[half:]), handle)
    return [f"{root}/part-0.jsonl", f"{root}/part-1.parquet"]


def expected_selections(scores: pd.DataFrame, filter_correct: bool) -> dict[tuple[str, str], str]:
    """Independent argmax/argmin per prompt, ties by teacher then trace_id."""
    picked = {}
    eligible = scores[scores["correct"] == True] if filter_correct else scores  # noqa: E712
    for metric, ascending in (
        ("lalp", False),
        ("lalp_drop1", False),
        ("galp", False),
        ("rsr", True),
        ("ifd", True),
        ("ifd_ppl", True),
    ):
        ordered = eligible.dropna(subset=[metric]).sort_values(
            [metric, "teacher", "trace_id"], ascending=[ascending, True, True]
        )
        for prompt_id, first in (
            ordered.groupby("prompt_id").head(1).set_index("prompt_id").iterrows()
        ):
            picked[(prompt_id, metric)] = first["trace_id"]
    return picked


def check_outputs(
    url: str, rows: list[dict], filter_correct: bool = True, curate_by: str = "lalp"
) -> None:
    scores = read_output(url, "scores")
    assert len(scores) == len(rows)
    assert list(scores.columns) == [
        "prompt_id", "teacher", "trace_id", "n_tokens", "n_steps", "galp", "lalp", "lalp_drop1",
        "lalp_token", "ifd", "ifd_ppl", "rsr", "avg_rank", "avg_surprisal", "truncated",
        "step_logprobs", "correct",
    ]  # fmt: skip
    assert scores["trace_id"].is_unique
    assert (scores["n_tokens"] > 0).all() and scores["lalp"].notna().all()
    assert (scores["ifd"] > 0).all() and (scores["ifd_ppl"] > 0).all()  # scoring.ifd: on
    rejects = read_output(url, "rejects")
    assert sorted(rejects["reason"]) == [
        "empty response",
        "invalid JSON: Expecting property name enclosed in double quotes at column 2",
    ]
    assert set(rejects["row_number"]) == {len(rows) // 2 + 1, len(rows) // 2 + 2}
    assert all(f.endswith("part-0.jsonl") for f in rejects["source_file"])

    selections = read_output(url, "selections")
    got = {(r.prompt_id, r.metric): r.trace_id for r in selections.itertuples()}
    assert got == expected_selections(scores, filter_correct)

    teachers = read_output(url, "teachers").set_index(["metric", "teacher"])
    for metric in SELECTED_BY:  # the metrics traces are selected by
        means = scores.groupby("teacher")[metric].mean()
        wins = selections[selections["metric"] == metric]["teacher"].value_counts()
        for teacher in TEACHERS:
            row = teachers.loc[(metric, teacher)]
            assert row["mean"] == pytest.approx(means[teacher])
            assert row["ci_low"] <= row["mean"] <= row["ci_high"]
            assert row["count"] == (scores["teacher"] == teacher).sum()
            assert row["wins"] == wins.get(teacher, 0)
        order = means.sort_values(ascending=better_direction(metric) == "lower").index.tolist()
        assert teachers.xs(metric).sort_values("rank").index.tolist() == order
    by_teacher = scores.groupby("teacher")
    dataset_rsr = by_teacher["avg_rank"].sum() / by_teacher["avg_surprisal"].sum()
    for teacher in TEACHERS:
        assert teachers.loc[("rsr_dataset", teacher), "mean"] == pytest.approx(dataset_rsr[teacher])
    for metric in ("lalp_token", "avg_rank", "avg_surprisal"):  # every per-trace metric
        means = scores.groupby("teacher")[metric].mean()
        for teacher in TEACHERS:
            assert teachers.loc[(metric, teacher), "mean"] == pytest.approx(means[teacher])
            assert pd.isna(teachers.loc[(metric, teacher), "wins"])

    # paired comparisons over the prompts both teachers answered (one trace each here)
    pairs = read_output(url, "teacher_pairs").set_index(["metric", "teacher_a", "teacher_b"])
    assert len(pairs) == len(TEACHER_METRICS) * len(TEACHERS) * (len(TEACHERS) - 1)
    wide = scores.pivot(index="prompt_id", columns="teacher", values="lalp")
    first, second = TEACHERS[0], TEACHERS[1]
    shared = wide[[first, second]].dropna()
    row = pairs.loc[("lalp", first, second)]
    assert row["n_prompts"] == len(shared)
    assert row["mean_diff"] == pytest.approx((shared[first] - shared[second]).mean())
    assert row["win_rate"] == pytest.approx(
        ((shared[first] > shared[second]) + 0.5 * (shared[first] == shared[second])).mean()
    )
    ranked = teachers.xs("lalp").sort_values("rank")
    top, runner_up = ranked.index[0], ranked.index[1]
    assert (
        ranked.loc[top, "separated_from_next"] == pairs.loc[("lalp", top, runner_up), "separated"]
    )
    curve = read_output(url, "teacher_stability")
    assert set(curve["metric"]) == set(pairs.index.get_level_values("metric"))
    assert (curve.groupby("metric")["agreement"].last() == 1.0).all()  # all prompts: the ranking

    curated = read_output(url, "curated")
    picked = set(selections[selections["metric"] == curate_by]["trace_id"])
    assert set(curated["trace_id"]) == picked
    source = {(r["prompt_id"], r["teacher"]): r for r in rows}
    for record in curated.to_dict("records"):
        original = source[(record["prompt_id"], record["teacher"])]
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert record["messages"][1]["content"] == original["response"]
        assert record["source"] == original["source"]


def job_config(input_url: str, output_url: str, student: str, *extra: str):
    return load_config(
        "default",
        [
            f"input.path={input_url}",
            f"output.path={output_url}",
            f"student.model={student}",
            "compute.batch_traces=4",
            "compute.token_budget=256",
            "selection.bootstrap_samples=200",
            "output.max_reject_fraction=0.2",  # the shards hold two bad lines in 20
            *extra,
        ],
    )


def test_job_on_local_jsonl_and_parquet(ray_cluster, tiny_student_dir, tmp_path):
    import fsspec

    rows = make_rows()
    write_shards(fsspec.filesystem("file"), str(tmp_path / "in"), rows)
    out = str(tmp_path / "out")
    manifest = run_score(job_config(str(tmp_path / "in"), out, tiny_student_dir))
    check_outputs(out, rows)

    counts = manifest.counts
    assert counts["rows_read"] == len(rows) + 2
    assert counts["rows_scored"] == len(rows) and counts["rows_rejected"] == 2
    for entry in manifest.inputs:
        assert entry["rows_read"] == entry["rows_scored"] + entry["rows_rejected"]
    stages = manifest.stages
    assert stages["tokenize_score"]["traces_scored_now"] == len(rows)
    assert stages["tokenize_score"]["tokens_scored_now"] == counts["tokens_scored"] > 0
    assert stages["tokenize_score"]["attention"] == ["sdpa per segment, float32"]
    assert stages["assemble"]["rows_rejected"] == 2 and stages["reduce"]["prompts"] == 6
    assert all(stage["seconds"] > 0 for stage in stages.values())
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["student"]["identity"].startswith(tiny_student_dir)
    assert on_disk["selection"]["filtered_on_correct"] is True

    # re-run only the reduce stage with another selection option: scores are not recomputed
    scores_dir = tmp_path / "out" / on_disk["outputs"]["scores"]
    assert on_disk["outputs"]["scores"] == f"_runs/{on_disk['run_id']}/scores"
    scores_before = sorted(p.stat().st_mtime_ns for p in scores_dir.iterdir())
    cfg = job_config(str(tmp_path / "in"), out, tiny_student_dir, "selection.require_correct=false")
    selected = run_select(cfg)
    check_outputs(out, rows, filter_correct=False)
    assert selected.to_json() == json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert selected.stages["reduce"]["seconds"] == selected.timings["reduce_s"]
    assert selected.stages["reduce"]["prompts"] == 6
    assert selected.finished_at >= on_disk["finished_at"]
    scores_after = sorted(p.stat().st_mtime_ns for p in scores_dir.iterdir())
    assert scores_before == scores_after
    # the new reduce outputs lie in a folder of their own; the published scores stay where they are
    assert selected.outputs["scores"] == on_disk["outputs"]["scores"]
    assert selected.outputs["selections"] == f"_runs/{selected.run_id}/selections"
    assert selected.run_id != on_disk["run_id"]
    assert not read_output(out, "teachers").empty
    assert selected.outputs["teacher_pairs"] == f"_runs/{selected.run_id}/teacher_pairs"
    summary = format_summary(
        selected, read_output(out, "teachers"), read_output(out, "teacher_pairs")
    )
    assert "Pairs told apart" in summary or "Pairs not told apart" in summary
    # One overview first (every teacher's rank by every metric, the selections' agreement),
    # then the per-metric details.
    overview = summary.index("Overview: each teacher's rank by each metric")
    assert overview < summary.index("In detail, metric by metric:") < summary.index("Teachers by")
    agree = summary.split("The selections agree (same trace for a prompt): ")[1].split("\n")[0]
    assert "galp and lalp " in agree and "ifd and ifd_ppl " in agree
    statement = selected.selection["stability"]["lalp"]["statement"]
    assert f"{statement[0].upper()}{statement[1:]}." in summary

    # The curated set by another metric: IFD's picks, lower is better.
    by_ifd = job_config(str(tmp_path / "in"), out, tiny_student_dir, "selection.curate_by=ifd")
    curated = run_select(by_ifd)
    check_outputs(out, rows, curate_by="ifd")
    wins = read_output(out, "teachers").set_index(["metric", "teacher"])["wins"]
    assert curated.selection["prompts_selected"] == wins.xs("ifd").sum() == 6


def test_large_files_are_read_in_pieces_with_exact_provenance(
    ray_cluster, tiny_student_dir, tmp_path
):
    """Both shards cut into many pieces (JSONL byte ranges, Parquet row groups): every row is
    read once, with the line or row number it has in its file, and the outputs are those of
    whole files."""
    import fsspec

    rows = make_rows()
    root = tmp_path / "in"
    write_shards(fsspec.filesystem("file"), str(root), rows)
    parquet = root / "part-1.parquet"
    pq.write_table(pq.read_table(parquet), parquet, row_group_size=2)
    out = str(tmp_path / "out")
    manifest = run_score(job_config(str(root), out, tiny_student_dir, "input.split_bytes=300"))
    check_outputs(out, rows)
    half = len(rows) // 2
    assert {e["path"].rsplit("/", 1)[-1]: e["rows_read"] for e in manifest.inputs} == {
        "part-0.jsonl": half + 2,
        "part-1.parquet": len(rows) - half,
    }
    numbers = read_output(out, "_rows").groupby("source_file")["row_number"].apply(sorted)
    by_name = {name.rsplit("/", 1)[-1]: list(n) for name, n in numbers.items()}
    assert by_name == {
        "part-0.jsonl": list(range(1, half + 3)),
        "part-1.parquet": list(range(1, len(rows) - half + 1)),
    }
    # each shard's pieces were read by several tasks: each wrote its rows as a file of _valid/
    valid = tmp_path / "out" / "_runs" / manifest.run_id / "_valid"
    holders = {}
    for path in valid.glob("*.parquet"):
        for name in set(pq.read_table(path, columns=["source_file"])["source_file"].to_pylist()):
            holders.setdefault(name.rsplit("/", 1)[-1], set()).add(path.name)
    assert {name: len(files) > 1 for name, files in holders.items()} == {
        "part-0.jsonl": True,
        "part-1.parquet": True,
    }


def test_connect_ray_reads_parquet_with_v1_unless_told(ray_cluster, monkeypatch):
    from ray.data import DataContext

    context = DataContext.get_current()
    monkeypatch.setattr(context, "shuffle_strategy", context.shuffle_strategy)
    monkeypatch.setattr(context, "use_datasource_v2", True)
    monkeypatch.delenv("RAY_DATA_USE_DATASOURCE_V2", raising=False)
    connect_ray(ComputeConfig())
    assert context.use_datasource_v2 is False
    context.use_datasource_v2 = True
    monkeypatch.setenv("RAY_DATA_USE_DATASOURCE_V2", "1")  # an explicit choice stands
    connect_ray(ComputeConfig())
    assert context.use_datasource_v2 is True


def test_job_reads_and_writes_s3(ray_cluster, s3_server, tiny_student_dir):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("ln-ray-test")
    rows = make_rows(n_prompts=4, seed=1)
    write_shards(fs, "ln-ray-test/traces", rows)
    # the JSONL shard is read in pieces: byte ranges of an object, read over HTTP
    cfg = job_config(
        "s3://ln-ray-test/traces/",
        "s3://ln-ray-test/runs/r1",
        tiny_student_dir,
        "input.split_bytes=500",
    )
    manifest = run_score(cfg)
    fs.invalidate_cache()
    assert fs.exists("ln-ray-test/runs/r1/manifest.json")
    check_outputs("s3://ln-ray-test/runs/r1", rows)
    assert {entry["path"] for entry in manifest.inputs} == {
        "s3://ln-ray-test/traces/part-0.jsonl",
        "s3://ln-ray-test/traces/part-1.parquet",
    }
    text = json.dumps(manifest.to_json())
    assert "testing-secret-key" not in text and "testing-key-id" not in text


def test_row_counts_per_file_and_reason(ray_cluster):
    import ray

    from ln_ray.pipeline.accounting import AccountingError, count_rows
    from ln_ray.schema import SCORED_ROWS_SCHEMA

    def row(source, number, trace=None, n_tokens=None, reason=None, kind="input", item=None):
        return {
            "source_file": source,
            "row_number": number,
            "item": item,
            "trace_id": trace,
            "reject_reason": reason,
            "reject_kind": None if reason is None else kind,
            "n_tokens": n_tokens,
            "model_tokens": None if n_tokens is None else 5 * n_tokens,
        }

    old, new = "a" * 32, "b" * 32
    rows = [
        row("f1", 1, old, 10),
        row("f1", 2, new, 20),
        row("f1", 3, reason="invalid JSON: line 3"),
        row("f2", 1, reason="duplicate of f1 row 1", kind="duplicate"),
        row("f2", None, reason="cannot read Parquet shard: bad footer"),
        # one per_prompt row of three traces: two scored, one rejected
        *(row("f3", 1, t, 7, item=i) for i, t in enumerate(("c" * 32, "d" * 32))),
        row("f3", 1, reason="empty response", item=2),
    ]
    table = pa.Table.from_pylist(rows, schema=SCORED_ROWS_SCHEMA)
    # the rows whose trace was new (lookup.new_row_keys): f1 row 2, and f3 row 1's item 1 alone
    keys = {
        "source_file": ["f1", "f3"],
        "row_number": [2, 1],
        "item": pa.array([None, 1], pa.int32()),
    }
    new_keys = ray.data.from_arrow(pa.table(keys))
    # two blocks, so the per-block sums are added up
    dataset = ray.data.from_arrow([table.slice(0, 2), table.slice(2)])
    counted = count_rows(dataset, new_keys)
    per_file = counted.per_file
    assert per_file["f1"] == {
        "rows_scored": 2,
        "rows_rejected": 1,
        "input_rows": 3,
        "shard_errors": 0,
        "tokens_scored": 30,
        "model_tokens": 150,
        "tokens_scored_now": 20,
        "model_tokens_now": 100,
    }
    assert per_file["f2"]["rows_rejected"] == 2 and per_file["f2"]["shard_errors"] == 1
    assert per_file["f3"] == {
        **dict.fromkeys(per_file["f3"], 0),
        **{"rows_scored": 2, "rows_rejected": 1, "input_rows": 1},
        **{"tokens_scored": 14, "model_tokens": 70, "tokens_scored_now": 7, "model_tokens_now": 35},
    }
    assert counted.reasons == {
        **{"cannot read Parquet shard": 1, "duplicate": 1, "invalid JSON": 1},
        "empty response": 1,
    }
    assert counted.kinds == {"duplicate": 1, "input": 3}
    nothing_new = count_rows(dataset, None).per_file["f1"]  # a run that found nothing new
    assert nothing_new["tokens_scored_now"] == 0 and nothing_new["tokens_scored"] == 30

    unscored = pa.Table.from_pylist([row("f1", 4, new)], schema=SCORED_ROWS_SCHEMA)
    with pytest.raises(AccountingError, match="1 accepted rows have no scores"):
        count_rows(ray.data.from_arrow(unscored), new_keys)


def test_job_scores_every_teacher_for_a_thinking_student(ray_cluster, tiny_student_dir, tmp_path):
    """An R1-distill-style student, teachers marking their reasoning four ways: every row is
    scored, and the curated set holds each trace as scored, in the student's markers."""

    reasoning = "Let me think. The boat holds all three.\n"
    answer = "Cross once."
    styles = {
        "think": {"response": f"<think>\n{reasoning}</think>\n\n{answer}"},
        "harmony": {
            "response": f"<|channel|>analysis<|message|>{reasoning}<|end|><|start|>assistant"
            f"<|channel|>final<|message|>{answer}<|return|>"
        },
        "api": {"response": answer, "reasoning": reasoning},
        "plain": {"response": f"{reasoning}{answer}"},
    }
    rows = [
        {"prompt_id": f"q{p}", "prompt": f"Puzzle {p}: how?", "teacher": teacher, **fields}
        for p in range(3)
        for teacher, fields in styles.items()
    ]
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "traces.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    out = str(tmp_path / "out")
    cfg = job_config(str(tmp_path / "in"), out, tiny_student_dir, "scoring.reasoning=student")
    cfg.student.chat_template = R1_DISTILL
    manifest = run_score(cfg)
    assert manifest.counts["rows_rejected"] == 0
    assert manifest.config["scoring"]["render"] == "generation"
    scores = read_output(out, "scores")
    assert len(scores) == len(rows) and scores["lalp"].notna().all()
    # the three marked teachers present one and the same trace per prompt
    marked = scores[scores["teacher"] != "plain"]
    assert (marked.groupby("prompt_id")["trace_id"].nunique() == 3).all()
    assert (marked.groupby("prompt_id")["lalp"].nunique() == 1).all()
    presented = f"<think>\n{reasoning.strip()}\n</think>\n\n{answer}"
    curated = read_output(out, "curated")
    assert "reasoning" not in curated.columns
    for record in curated.to_dict("records"):
        content = record["messages"][-1]["content"]
        assert content == (f"{reasoning}{answer}" if record["teacher"] == "plain" else presented)


def _by_prompt(check, table: pa.Table) -> pa.Table:
    """``check`` over rows spread across many blocks, grouped by prompt as the job groups them."""
    import ray

    from ln_ray.pipeline.ray_ops import collect, grouped_by_hash
    from ln_ray.schema import LATE_REJECTS_SCHEMA

    blocks = [table.slice(i, 23) for i in range(0, table.num_rows, 23)]
    found = grouped_by_hash(ray.data.from_arrow(blocks).repartition(9), "prompt_id", check, 4)
    return collect(found, LATE_REJECTS_SCHEMA)


def test_duplicates_are_found_across_blocks(ray_cluster):
    """Copies of a row spread over many blocks: every later copy is marked, the first is not."""
    from ln_ray.pipeline.row_checks import duplicate_rows

    rng = random.Random(3)
    rows = []
    for n in range(1, 400):
        key = rng.randrange(60)
        rows.append(
            {
                "prompt_id": f"p{key % 17}",
                "dup_key": f"k{key}",
                "source_file": f"f{rng.randrange(3)}",
                **_place(n),
            }
        )
    rows += [{"prompt_id": "p0", "dup_key": None, "source_file": "f0", "row_number": 999}]
    found = _by_prompt(duplicate_rows, _padded(rows, _CHECKED))
    got = {_key(r): r["reason"] for r in found.to_pylist()}
    expected = {}
    for key in {r["dup_key"] for r in rows if r["dup_key"]}:
        copies = sorted((_key(r) for r in rows if r["dup_key"] == key), key=_order)
        for copy in copies[1:]:
            expected[copy] = f"duplicate of {_shown(copies[0])}"
    assert got == expected and len(expected) > 300
    assert any(" item " in reason for reason in got.values())


def test_prompt_ids_naming_different_prompts_are_found_across_blocks(ray_cluster):
    """Rows of many prompt ids spread over many blocks, some ids with two or three contexts:
    every row of those ids is marked, naming the first row of two contexts; no other row is."""
    from ln_ray.pipeline.row_checks import conflicting_rows

    rng = random.Random(4)
    rows = []
    for n in range(1, 400):
        prompt = rng.randrange(50)
        contexts = 1 + (prompt % 7 == 0) + (prompt % 14 == 0)  # some ids: two or three prompts
        rows.append(
            {
                "prompt_id": f"p{prompt:02d}",
                "context_key": f"c{prompt}-{rng.randrange(contexts)}",
                "source_file": f"f{rng.randrange(3)}",
                **_place(n),
            }
        )
    rows.append({"prompt_id": "p00", "context_key": None, "source_file": "f0", "row_number": 999})
    found = _by_prompt(conflicting_rows, _padded(rows, _CHECKED))
    got = {_key(r): r["reason"] for r in found.to_pylist()}
    expected = {}
    valid = [r for r in rows if r["context_key"] is not None]
    for prompt in {r["prompt_id"] for r in valid}:
        mine = [r for r in valid if r["prompt_id"] == prompt]
        firsts = sorted(
            (
                min((_key(r) for r in mine if r["context_key"] == key), key=_order)
                for key in {r["context_key"] for r in mine}
            ),
            key=_order,
        )
        if len(firsts) > 1:
            reason = (
                f"prompt_id shared by different prompts: {prompt!r} in {_shown(firsts[0])} "
                f"and {_shown(firsts[1])}"
            ) + (f" ({len(firsts)} prompts in all)" if len(firsts) > 2 else "")
            for r in mine:
                expected[_key(r)] = reason
    assert got == expected and len(expected) > 30
    assert set(found["kind"].to_pylist()) == {"input"}


def test_new_rows_are_found_bucket_by_bucket_with_their_first_copy(ray_cluster, tmp_path):
    """Rows spread over several _valid/ files, many holding a trace another row holds, some
    traces in the score cache: the lookup keeps the rows whose trace the cache lacks, scores the
    first copy of each (smallest source_file, row_number) and marks the others repeats of it;
    each tokenizing task finds its own file's rows to score. The traces the scoring actors reject
    (``_late/``) reach every row holding them, first copies and repeats, in the assembly."""
    from ln_ray.io.cache import bucket_name
    from ln_ray.io.run_folder import OutputRoot
    from ln_ray.pipeline.assemble import assemble_rows
    from ln_ray.pipeline.lookup import find_new_rows, to_score
    from ln_ray.schema import CACHE_SCHEMA, SCORING_REJECTS_SCHEMA, VALIDATED_SCHEMA

    rng = random.Random(5)
    traces = [rng.randrange(80) for _ in range(1, 400)]
    rows = [
        {
            "prompt_id": f"p{trace % 7}",
            "trace_id": f"{trace:032x}",
            "source_file": f"f{rng.randrange(3)}",
            **_place(n),
            "reject_reason": "bad" if n % 17 == 0 else None,
        }
        for n, trace in enumerate(traces, start=1)
    ]
    root = OutputRoot(str(tmp_path / "out"))
    run = root.new_run()
    for part in range(5):
        run.write_table(f"_valid/part-{part}.parquet", _padded(rows[part::5], VALIDATED_SCHEMA))
    buckets = 4
    cache = root.cache("key")
    in_cache = sorted({r["trace_id"] for r in rows})[::3]
    for bucket in range(buckets):
        ids = [{"trace_id": t} for t in in_cache if int(t[:12], 16) % buckets == bucket]
        cache.write_table(bucket_name(bucket, buckets), _padded(ids, CACHE_SCHEMA))

    found = find_new_rows(run, cache, buckets)

    expected = {}
    accepted = [r for r in rows if r["reject_reason"] is None and r["trace_id"] not in in_cache]
    for trace in {r["trace_id"] for r in accepted}:
        copies = sorted((_key(r) for r in accepted if r["trace_id"] == trace), key=_order)
        expected[copies[0]] = ("score", None)
        expected.update({copy: ("repeat", copies[0]) for copy in copies[1:]})
    got = {
        _key(r): (
            r["status"],
            None if r["first_file"] is None else (r["first_file"], r["first_row"], r["first_item"]),
        )
        for r in run.read_table("_new").to_pylist()
    }
    assert got == expected
    firsts = sorted(k for k, (status, _) in expected.items() if status == "score")
    assert (found.to_score, found.repeats) == (len(firsts), len(expected) - len(firsts))
    assert found.repeats > 100 and found.to_score > 20
    chosen = []
    for part in range(5):
        keys = to_score(run, f"_valid/part-{part}.parquet").to_pylist()
        assert set(keys) <= {_text_key(_key(r)) for r in rows[part::5]}
        chosen += keys
    assert sorted(chosen) == sorted(_text_key(first) for first in firsts)

    trace_of = {_key(r): r["trace_id"] for r in rows}
    failed = {trace_of[first] for first in firsts[:5]}
    for part, chosen in enumerate([sorted(failed)[:2], sorted(failed)[2:]]):
        late = [
            {"prompt_id": f"p{int(t, 16) % 7}", "trace_id": t, "reason": f"bad {t[-2:]}"}
            for t in chosen
        ]
        table = _padded([{**r, "kind": "render"} for r in late], SCORING_REJECTS_SCHEMA)
        run.write_table(f"_late/part-{part}.parquet", table)
    assemble_rows(run, cache, buckets)
    assembled = run.read_table("_rows").to_pylist()
    assert len(assembled) == len(rows)
    late_reasons = {
        _key(r): (r["reject_reason"], r["reject_kind"])
        for r in assembled
        if r["reject_reason"] is not None and r["reject_reason"] != "bad"
    }
    assert late_reasons == {
        copy: (f"bad {trace_of[copy][-2:]}", "render")
        for copy in expected
        if trace_of[copy] in failed
    }
    assert len(late_reasons) > 5  # the repeats of the rejected first copies too


def _place(n: int) -> dict:
    """Row ``n``'s place: half the rows are responses of per_prompt rows (an item of a shared
    row number), half are rows of their own."""
    if n % 2:
        return {"row_number": n // 3, "item": n % 3}
    return {"row_number": 1000 + n, "item": None}


_CHECKED = pa.schema(
    [
        *(("prompt_id", pa.string()), ("dup_key", pa.string()), ("context_key", pa.string())),
        *(("source_file", pa.string()), ("row_number", pa.int64()), ("item", pa.int32())),
    ]
)


def _key(row: dict) -> tuple:
    return row["source_file"], row["row_number"], row.get("item")


def _order(key: tuple) -> tuple:
    """Row keys in the job's order: file, row, then item (null first)."""
    file, row, item = key
    return file, row, -1 if item is None else item


def _shown(key: tuple) -> str:
    file, row, item = key
    return f"{file} row {row}" + ("" if item is None else f" item {item}")


def _text_key(key: tuple) -> str:
    file, row, item = key
    return f"{file}\x00{row}\x00{'' if item is None else item}"


def _padded(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """``rows`` in ``schema``, the columns they lack null."""
    from ln_ray.schema import padded

    return padded(pa.Table.from_pylist(rows), schema)


def test_a_run_without_ifd_ranks_no_teacher_on_it(ray_cluster, tiny_student_dir, tmp_path):
    """scoring.ifd=false: ifd and ifd_ppl are NaN, and nothing ranks, selects or plots them
    (no rank made of NaNs, no stability claimed for them)."""
    from ln_ray.report import load_run, render_report

    rows = make_rows(n_prompts=3)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "out")
    manifest = run_score(
        job_config(str(tmp_path / "in"), out, tiny_student_dir, "scoring.ifd=false")
    )
    scores = read_output(out, "scores")
    assert scores[["ifd", "ifd_ppl"]].isna().all().all() and scores["lalp"].notna().all()
    ranked = {"teachers", "teacher_stability", "teacher_pairs", "selections"}
    for name in ranked:
        assert not {"ifd", "ifd_ppl"} & set(read_output(out, name)["metric"]), name
    assert not {"ifd", "ifd_ppl"} & set(manifest.selection["stability"])
    summary = format_summary(
        manifest, read_output(out, "teachers"), read_output(out, "teacher_pairs")
    )
    assert "ifd" not in summary and "Teachers by lalp" in summary
    assert "ifd" not in render_report(load_run(out))
