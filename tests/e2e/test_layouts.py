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
