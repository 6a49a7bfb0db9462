"""The job on corpora laid out as distillation datasets ship: a folder per teacher with ShareGPT
conversations and a system column, a file per teacher and prompt set with nested answers. The
same traces score the same in any layout."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ln_ray.pipeline.job import JobError, run_score
from tests.helpers import make_rows, read_output, tiny_job_config, write_jsonl

SYSTEM = "Answer briefly."


def _sharegpt(row: dict) -> dict:
    return {
        "id": int(row["prompt_id"][1:]),
        "system": SYSTEM,
        "conversations": [
            {"from": "human", "value": row["prompt"]},
            {"from": "gpt", "value": row["response"]},
        ],
    }


def _openai(row: dict) -> dict:
    return {
        "id": int(row["prompt_id"][1:]),
        "teacher": row["teacher"],
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]},
        ],
    }


def test_a_folder_per_teacher_of_sharegpt_parquet_scores_as_per_trace_rows_and_stays_sharegpt(
    ray_cluster, tiny_student_dir, tmp_path
):
    rows = make_rows(n_prompts=4)
    teachers = sorted({row["teacher"] for row in rows})
    for teacher in teachers:
        mine = [_sharegpt(row) for row in rows if row["teacher"] == teacher]
        folder = tmp_path / "hive" / f"teacher={teacher}"
        folder.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(mine), folder / "part-0.parquet")
    write_jsonl(tmp_path / "flat" / "traces.jsonl", [_openai(row) for row in rows])

    hive_out, flat_out = str(tmp_path / "out-hive"), str(tmp_path / "out-flat")
    hive = run_score(
        tiny_job_config(
            tmp_path / "hive",
            hive_out,
            tiny_student_dir,
            "input.teacher_from_path=hive",
            "input.columns.messages=conversations",
            "input.columns.prompt_id=id",
            "output.messages_format=sharegpt",  # the curated set as it came
        )
    )
    flat = run_score(
        tiny_job_config(tmp_path / "flat", flat_out, tiny_student_dir, "input.columns.prompt_id=id")
    )
    assert hive.counts["rows_read"] == hive.counts["rows_scored"] == len(rows)
    columns = ["prompt_id", "teacher", "trace_id", "lalp", "galp"]
    by_layout = [
        read_output(out, "scores")[columns].sort_values("trace_id").reset_index(drop=True)
        for out in (hive_out, flat_out)
    ]
    assert by_layout[0].equals(by_layout[1])  # the same traces, ids and scores
    assert sorted(by_layout[0]["teacher"].unique()) == teachers
    assert flat.counts["rows_scored"] == len(rows)
    curated = read_output(hive_out, "curated")
    assert "messages" not in curated.columns
    for conversation in curated["conversations"]:
        assert [m["from"] for m in conversation] == ["system", "human", "gpt"]
        assert conversation[0]["value"] == SYSTEM
    for messages in read_output(flat_out, "curated")["messages"]:
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]


def test_a_file_per_teacher_and_prompt_set_with_nested_answers(
    ray_cluster, tiny_student_dir, tmp_path
):
    rows = make_rows(n_prompts=3)
    for teacher in sorted({row["teacher"] for row in rows}):
        for prompt_set in ("gpqa", "aime"):
            records = [
                {
                    "idx": int(row["prompt_id"][1:]),
                    "question": f"{prompt_set}: {row['prompt']}",
                    "info": {"answer_content": row["response"], "source": row["source"]},
                }
                for row in rows
                if row["teacher"] == teacher
            ]
            write_jsonl(tmp_path / "in" / "traces" / f"{teacher}_{prompt_set}.jsonl", records)
    out = str(tmp_path / "out")
    manifest = run_score(
        tiny_job_config(
            tmp_path / "in",
            out,
            tiny_student_dir,
            r"input.teacher_from_path=(?P<teacher>[^/]+)_(?P<prompt_set>[a-z]+)\.jsonl$",
            "input.columns.prompt=question",
            "input.columns.prompt_id=idx",
            "input.columns.response=info.answer_content",
        )
    )
    # The prompt sets number their prompts alike: their ids stay apart, none shared.
    assert manifest.counts["rows_scored"] == 2 * len(rows)
    scores = read_output(out, "scores")
    assert sorted(scores["prompt_id"].unique()) == sorted(
        f"{s}/{p}" for s in ("aime", "gpqa") for p in range(3)
    )
    assert scores.groupby("prompt_id")["teacher"].nunique().eq(3).all()
    curated = read_output(out, "curated")
    # The rest of the nested column stays (as JSON text: an object column).
    assert all(json.loads(info).keys() == {"source"} for info in curated["info"])


def test_a_file_whose_path_names_no_teacher_stops_the_run_before_it_starts(
    tiny_student_dir, tmp_path
):
    write_jsonl(tmp_path / "in" / "teacher=qwq" / "a.jsonl", make_rows(n_prompts=1))
    write_jsonl(tmp_path / "in" / "stray.jsonl", make_rows(n_prompts=1))
    cfg = tiny_job_config(
        tmp_path / "in", tmp_path / "out", tiny_student_dir, "input.teacher_from_path=hive"
    )
    with pytest.raises(JobError, match=r"in/stray.jsonl names no teacher \(no teacher=NAME/"):
        run_score(cfg)


def _per_prompt(rows: list[dict], prompt_id: str) -> dict:
    """One prompt's traces as OpenR1-Math writes them: a row with parallel lists."""
    mine = [row for row in rows if row["prompt_id"] == prompt_id]
    return {
        "uuid": int(prompt_id[1:]),
        "problem": mine[0]["prompt"],
        "generations": [row["response"] for row in mine],
        "model": [row["teacher"] for row in mine],
        "correctness_math_verify": [row["correct"] for row in mine],
        "finish_reasons": ["stop"] * len(mine),
        # OpenR1's messages hold one of the generations: per_prompt never reads them.
        "messages": [{"role": "user", "content": "ignored"}, {"role": "assistant", "content": "x"}],
    }


def test_a_row_per_prompt_with_parallel_lists_scores_as_a_row_per_trace(
    ray_cluster, tiny_student_dir, tmp_path
):
    rows = make_rows(n_prompts=4)
    ids = sorted({row["prompt_id"] for row in rows})
    per_prompt = [_per_prompt(rows, prompt_id) for prompt_id in ids]
    # Two more rows: lists of different lengths (rejected whole, never cut), and a prompt whose
    # two responses are the same text from one teacher (the second is a duplicate of the first).
    broken = {**_per_prompt(rows, "q0"), "uuid": 90, "model": ["a", "b"]}
    again = {**_per_prompt(rows, "q1"), "uuid": 91, "model": ["solo"] * 3}
    again["generations"] = [again["generations"][0]] * 3
    write_jsonl(tmp_path / "prompts" / "part-0.jsonl", [*per_prompt, broken, again])
    write_jsonl(tmp_path / "flat" / "traces.jsonl", rows)

    out, flat_out = str(tmp_path / "out"), str(tmp_path / "out-flat")
    manifest = run_score(
        tiny_job_config(
            tmp_path / "prompts",
            out,
            tiny_student_dir,
            "input.layout=per_prompt",
            "input.columns.prompt=problem",
            "input.columns.prompt_id=uuid",
            "input.columns.teacher=model",
            "input.columns.correct=correctness_math_verify",
            "output.max_reject_fraction=0.5",
        )
    )
    run_score(tiny_job_config(tmp_path / "flat", flat_out, tiny_student_dir))
    (entry,) = manifest.inputs
    assert (entry["rows_in_file"], entry["input_rows"]) == (6, 6)
    assert entry["rows_read"] == len(rows) + 1 + 3  # traces: the broken row is one reject
    assert entry["rows_scored"] == len(rows) + 1

    columns = ["teacher", "lalp", "galp", "correct"]
    scores = read_output(out, "scores")
    mine = scores[scores["prompt_id"].isin([str(int(i[1:])) for i in ids])]
    flat = read_output(flat_out, "scores")
    assert len(mine) == len(flat) == len(rows)
    by_key = [
        frame.assign(p=frame["prompt_id"].str.lstrip("q"))
        .sort_values(["p", "teacher"])[columns]
        .reset_index(drop=True)
        for frame in (mine, flat)
    ]
    assert by_key[0].equals(by_key[1])  # the same traces, scored alike

    rejects = read_output(out, "rejects").sort_values(["row_number", "item"])
    assert rejects["row_number"].tolist() == [5, 6, 6]
    assert rejects.iloc[0]["reason"] == (
        "per_prompt lists differ in length: generations 3, model 2, correctness_math_verify 3"
    )
    assert rejects["item"].isna().tolist() == [True, False, False]
    assert rejects["item"].iloc[1:].tolist() == [1, 2]
    assert set(rejects["reason"].iloc[1:]) == {f"duplicate of {entry['path']} row 6 item 0"}

    curated = read_output(out, "curated")
    assert "generations" not in curated.columns and "model" not in curated.columns
    assert all(messages[0]["content"] != "ignored" for messages in curated["messages"])
    assert json.loads(curated["finish_reasons"].iloc[0]) == ["stop"] * 3


def test_a_row_per_prompt_without_teachers_names_each_response_by_its_place(
    ray_cluster, tiny_student_dir, tmp_path
):
    rows = make_rows(n_prompts=3)
    records = [
        {
            "problem": f"Puzzle {p}",
            "generations": [r["response"] for r in rows if r["prompt_id"] == f"q{p}"],
        }
        for p in range(3)
    ]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "in" / "train.parquet")
    out = str(tmp_path / "out")
    cfg = tiny_job_config(
        tmp_path / "in",
        out,
        tiny_student_dir,
        "input.layout=per_prompt",
        "input.columns.prompt=problem",
    )
    manifest = run_score(cfg)
    assert manifest.counts["rows_scored"] == len(rows)
    teachers = read_output(out, "teachers")
    assert sorted(teachers["teacher"].unique()) == [
        "generations[0]",
        "generations[1]",
        "generations[2]",
    ]
