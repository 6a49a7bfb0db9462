"""`ln-ray inspect` (ln_ray/inspect_input.py): how an input will be read, from a sample, with rows
rendered as the student sees them."""

from __future__ import annotations

import json

from ln_ray.cli import main
from ln_ray.config import load_config
from ln_ray.inspect_input import inspect_input
from tests.helpers import write_jsonl


def _sharegpt(n: int, teacher: str) -> dict:
    return {
        "id": n,
        "system": "Answer briefly.",
        "conversations": [
            {"from": "human", "value": f"What is {n} + {n}?"},
            {"from": "gpt", "value": f"First, add {n} and {n}. The sum is {2 * n}."},
        ],
        "source": teacher,
    }


def _corpus(tmp_path):
    for teacher in ("qwq", "r1"):
        rows = [_sharegpt(n, teacher) for n in range(1, 6)]
        write_jsonl(tmp_path / "in" / f"teacher={teacher}" / "part-0.jsonl", rows)
    broken = tmp_path / "in" / "teacher=r1" / "part-1.jsonl"
    empty = {**_sharegpt(9, "r1"), "conversations": [{"from": "human", "value": "Q?"},
                                                      {"from": "gpt", "value": " "}]}  # fmt: skip
    broken.write_text("{not json\n" + json.dumps(empty) + "\n")
    return tmp_path / "in"


def _config(folder, student, *extra):
    return load_config(
        "default",
        [
            f"input.path={folder}",
            f"student.model={student}",
            "input.teacher_from_path=hive",
            "input.columns.messages=conversations",
            "input.columns.prompt_id=id",
            *extra,
        ],
    )


def test_inspect_says_how_the_input_is_read_and_shows_what_the_student_scores(
    tiny_student_dir, tmp_path
):
    report = inspect_input(_config(_corpus(tmp_path), tiny_student_dir), rows=60, samples=1)
    assert "3 files (3 jsonl)" in report
    assert "sample: the first 20 rows of 3 files, 12 rows" in report
    assert "conversation from 'conversations' (ShareGPT-style)" in report
    assert "teacher from the path (teacher=NAME/ folders)" in report
    assert "  messages      conversations                 11 of 12 rows" in report
    assert "  system        system                        11 of 12 rows" in report
    assert "  response      response                      0 of 12 rows" in report
    assert "  r1: 6\n  qwq: 5\n  (none): 1\n" in report  # the unreadable line names none
    assert "would be rejected: 2 of 12 sampled rows" in report
    assert "1 x empty response (input), first " in report
    assert "part-1.jsonl row 1" in report and "invalid JSON" in report
    rendered = report.split("as the student sees them (the first 1 accepted rows):\n")[1]
    assert rendered.startswith("── ") and "teacher 'qwq', prompt_id '1'" in rendered
    parts = [line for line in rendered.splitlines() if line.startswith("⟦")]
    assert parts == [
        "⟦context⟧",
        "⟦generation prompt (not scored)⟧",
        "⟦response: scored, step by step⟧",
        "⟦end of turn (never scored)⟧",
    ]
    assert "Answer briefly." in rendered.split("⟦generation prompt")[0]  # the system column
    steps = [line for line in rendered.splitlines() if line.startswith("  [")]
    assert [line.split(":")[0] for line in steps] == ["  [1", "  [2"]
    texts = [json.loads(line.split(" tokens] ", 1)[1]) for line in steps]
    assert "".join(texts) == "First, add 1 and 1. The sum is 2."


def test_inspect_reads_the_first_rows_only(tiny_student_dir, tmp_path):
    good = [_sharegpt(n, "qwq") for n in range(1, 31)]
    path = tmp_path / "in" / "teacher=qwq" / "big.jsonl"
    write_jsonl(path, good)
    with path.open("a") as handle:
        handle.write("{never read\n" * 1000)
    report = inspect_input(_config(tmp_path / "in", tiny_student_dir), rows=25, samples=0)
    assert "25 rows" in report and "would be rejected: 0 of 25 sampled rows" in report


def test_the_cli_inspects_an_input_path(tiny_student_dir, tmp_path, capsys):
    folder = _corpus(tmp_path)
    code = main(
        [
            "inspect",
            str(folder),
            "--samples",
            "2",
            f"student.model={tiny_student_dir}",
            "input.teacher_from_path=hive",
            "input.columns.messages=conversations",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and out.count("⟦response: scored, step by step⟧") == 2
    # Without the path rule the rows name no teacher: inspect says so before a run does.
    code = main(["inspect", str(folder), f"student.model={tiny_student_dir}"])
    out = capsys.readouterr().out
    assert code == 0 and "would be rejected: 12 of 12 sampled rows" in out
    assert "11 x missing teacher (input)" in out


def test_inspect_shows_a_row_per_prompt_as_its_traces(tiny_student_dir, tmp_path):
    row = {"problem": "What is 1 + 1?", "generations": ["Add them. It is 2.", "Two."]}
    write_jsonl(tmp_path / "in" / "train.jsonl", [row, {**row, "generations": "2"}])
    cfg = load_config(
        "default",
        [
            f"input.path={tmp_path / 'in'}",
            f"student.model={tiny_student_dir}",
            "input.layout=per_prompt",
            "input.columns.prompt=problem",
        ],
    )
    report = inspect_input(cfg, rows=10, samples=2)
    assert "sample: the first 10 traces of 1 files, 3 traces" in report
    assert "layout: one row per prompt, each response in its list 'generations' a trace" in report
    assert "conversation from 'problem' and each of 'generations'" in report
    assert "teacher from column 'teacher' (else generations[item])" in report
    assert "  generations[0]: 1\n  generations[1]: 1\n" in report
    assert "1 x generations is not a non-empty list" in report and "train.jsonl row 2" in report
    assert "train.jsonl row 1 item 1: teacher 'generations[1]'" in report
