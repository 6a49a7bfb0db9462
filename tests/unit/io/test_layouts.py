"""The layouts corpora ship in (ln_ray/prepare/layout.py, io/shards.py): nested fields by dotted
names, ShareGPT conversations with a system column, the teacher and prompt set from the path."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ln_ray.config import ColumnsConfig, ConfigError, load_config
from ln_ray.io.shards import iter_jsonl, iter_parquet
from ln_ray.prepare.layout import PathFieldsError, check_pattern, path_fields
from ln_ray.prepare.rows import RowRejected, validate_row

# A row as reasoning datasets with nested answers write it (e.g. info.think_content).
NESTED = {
    "question": "What is 2+2?",
    "model": "qwq",
    "info": {"think_content": "Two and two.", "answer_content": "4", "source": "gsm8k"},
}


def _jsonl(*records: dict) -> io.BytesIO:
    return io.BytesIO(b"\n".join(json.dumps(r).encode() for r in records))


def test_dotted_column_names_read_nested_fields_and_leave_the_rest_as_extra():
    columns = ColumnsConfig(
        prompt="question",
        teacher="model",
        reasoning="info.think_content",
        response="info.answer_content",
    )
    (row,) = iter_jsonl(_jsonl(NESTED), columns)
    assert row["read_error"] is None
    assert (row["prompt"], row["teacher"]) == ("What is 2+2?", "qwq")
    assert (row["reasoning"], row["response"]) == ("Two and two.", "4")
    assert json.loads(row["extra"]) == {"info": {"source": "gsm8k"}}  # the fields taken leave
    assert NESTED["info"]["think_content"] == "Two and two."  # the record itself is untouched
    # A nested field wholly taken leaves no empty column; a column named with a dot is itself.
    taken = {**NESTED, "info": {"answer_content": "4"}, "a.b": "x"}
    (row,) = iter_jsonl(_jsonl(taken), ColumnsConfig(prompt="question", teacher="a.b"))
    assert row["teacher"] == "x" and set(json.loads(row["extra"])) == {"model", "info"}
    (row,) = iter_jsonl(_jsonl(taken), ColumnsConfig(response="info.answer_content"))
    assert "info" not in json.loads(row["extra"])
    # A path through a non-object is simply absent.
    (row,) = iter_jsonl(_jsonl({**NESTED, "info": "flat"}), columns)
    assert row["response"] is None and row["reasoning"] is None


def test_dotted_column_names_read_parquet_structs():
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([NESTED, {**NESTED, "model": "r1"}]), buffer)
    buffer.seek(0)
    columns = ColumnsConfig(prompt="question", teacher="model", response="info.answer_content")
    rows = list(iter_parquet(buffer, columns))
    assert [r["teacher"] for r in rows] == ["qwq", "r1"]
    assert [r["response"] for r in rows] == ["4", "4"]
    assert json.loads(rows[0]["extra"])["info"] == {
        "think_content": "Two and two.",
        "source": "gsm8k",
    }


# A row as ShareGPT-style corpora write it (OpenThoughts, Bespoke-Stratos).
SHAREGPT = {
    "system": "Think step by step.",
    "conversations": [
        {"from": "human", "value": "What is 2+2?"},
        {"from": "gpt", "value": "Two and two make four. The answer is 4."},
    ],
}


def _validated(record: dict, **columns: str):
    (raw,) = iter_jsonl(_jsonl(record), ColumnsConfig(**columns))
    assert raw["read_error"] is None
    return validate_row({**raw, "teacher": "t"}, 10_000)


def test_sharegpt_conversations_map_their_roles_and_fold_in_the_system_column():
    row = _validated(SHAREGPT, messages="conversations")
    assert row.messages == [
        {"role": "system", "content": "Think step by step."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Two and two make four. The answer is 4."},
    ]
    # The same conversation in OpenAI style, with the system message its own: the same trace.
    openai = {
        "messages": [
            {"role": "system", "content": "Think step by step."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "Two and two make four. The answer is 4."},
        ],
        "system": "Think step by step.",
    }
    assert _validated(openai).messages == row.messages
    # A system column also opens a prompt/response row; an empty one adds nothing.
    plain = {"prompt": "Q?", "response": "A.", "system": "Be brief."}
    assert [m["role"] for m in _validated(plain).messages] == ["system", "user", "assistant"]
    assert len(_validated({**plain, "system": " "}).messages) == 2


@pytest.mark.parametrize(
    "record, reason",
    [
        (
            {**SHAREGPT, "conversations": [{"from": "bot", "value": "x"}]},
            "a ShareGPT message is from 'bot', none of",
        ),
        (
            {
                **SHAREGPT,
                "conversations": [{"from": "system", "value": "Other."}]
                + SHAREGPT["conversations"],
            },
            "system differs from the conversation's own system message",
        ),
        (
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": 4}]},
            "a message lacks a string role or content",
        ),
    ],
)
def test_a_sharegpt_row_that_cannot_be_read_is_rejected_with_its_reason(record, reason):
    with pytest.raises(RowRejected, match="^" + reason.replace("(", r"\(")):
        _validated(record, messages="conversations")


def test_the_teacher_and_prompt_set_come_from_the_path():
    assert path_fields("s3://bucket/traces/teacher=qwq/part-0.parquet", "hive") == {
        "teacher": "qwq"
    }
    assert path_fields("/data/prompt_set=aime/teacher=deepseek%2Dr1/x.jsonl", "hive") == {
        "teacher": "deepseek-r1",
        "prompt_set": "aime",
    }
    pattern = r"(?P<teacher>[^/]+)_(?P<prompt_set>[^/_]+)\.jsonl$"
    assert path_fields("gs://b/traces/DeepSeek-R1_gpqa.jsonl", pattern) == {
        "teacher": "DeepSeek-R1",
        "prompt_set": "gpqa",
    }
    with pytest.raises(
        PathFieldsError, match="b/traces/notes.jsonl names no teacher \\(it does not match"
    ):
        path_fields("gs://b/traces/notes.jsonl", pattern)
    with pytest.raises(PathFieldsError, match="no teacher=NAME/ folder holds it"):
        path_fields("/data/qwq/part-0.parquet", "hive")  # the file's own name is not a folder
    assert check_pattern("hive") is None and check_pattern(pattern) is None
    assert "no group named teacher" in check_pattern(r"(?P<model>\w+)\.jsonl")
    assert "is not a regular expression" in check_pattern("(unclosed")
    with pytest.raises(ConfigError, match="no group named teacher"):
        load_config("default", [r"input.teacher_from_path=(\w+).jsonl"])


def test_rows_take_their_path_fields_and_a_teacher_column_must_agree():
    fields = {"teacher": "qwq", "prompt_set": "aime"}
    records = [
        {"prompt_id": 7, "prompt": "Q", "response": "A"},
        {"prompt_id": "7", "prompt": "Q", "response": "A", "teacher": "qwq"},
        {"prompt_id": 1.0, "prompt": "Q", "response": "A", "teacher": "r1"},
        {"prompt": "Q", "response": "A"},  # no id: the prompt's hash names it later
    ]
    rows = list(iter_jsonl(_jsonl(*records), ColumnsConfig(), from_path=fields))
    assert [r["teacher"] for r in rows] == ["qwq", "qwq", "r1", "qwq"]
    assert [r["prompt_id"] for r in rows] == ["aime/7", "aime/7", "aime/1", None]
    assert [r["read_error"] for r in rows] == [
        None,
        None,
        "teacher 'r1' differs from its path's 'qwq'",
        None,
    ]


# One prompt with its responses, as OpenR1-Math writes it (s1K's thinking_trajectories alike).
PER_PROMPT = {
    "problem": "What is 2+2?",
    "generations": ["It is 4.", "Four."],
    "correctness_math_verify": [True, False],
    "reasoning": ["Add.", "Count."],
    "meta": {"level": 1},
}


def _per_prompt(*records: dict, **columns: str) -> list[dict]:
    names = ColumnsConfig(prompt="problem", correct="correctness_math_verify", **columns)
    return list(iter_jsonl(_jsonl(*records), names, layout="per_prompt"))


def test_a_row_per_prompt_is_one_trace_per_response_with_its_parallel_values():
    rows = _per_prompt(PER_PROMPT, {**PER_PROMPT, "teacher": "qwq"})
    assert [(r["row_number"], r["item"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert [r["response"] for r in rows] == ["It is 4.", "Four."] * 2
    assert [r["correct"] for r in rows] == [True, False] * 2
    assert [r["reasoning"] for r in rows] == ["Add.", "Count."] * 2
    # No teacher: each response is named by its place; one teacher for all: that one.
    assert [r["teacher"] for r in rows] == ["generations[0]", "generations[1]", "qwq", "qwq"]
    assert all(r["read_error"] is None and r["prompt"] == "What is 2+2?" for r in rows)
    # The lists never travel with each trace; the other columns do.
    assert json.loads(rows[0]["extra"]) == {"meta": {"level": 1}}


def test_a_row_per_prompt_with_lists_of_different_lengths_is_one_reject_never_cut():
    (row,) = _per_prompt({**PER_PROMPT, "reasoning": ["Add."]})
    assert (row["row_number"], row.get("item")) == (1, None)
    assert row["read_error"] == (
        "per_prompt lists differ in length: generations 2, correctness_math_verify 2, reasoning 1"
    )
    missing, empty, text = _per_prompt(
        {"problem": "p"}, {**PER_PROMPT, "generations": []}, {**PER_PROMPT, "generations": "4"}
    )
    assert missing["read_error"] == "generations is missing (input.layout=per_prompt)"
    assert empty["read_error"] == "generations is not a non-empty list (input.layout=per_prompt)"
    assert text["read_error"] == empty["read_error"]


def test_a_row_per_prompt_reads_nested_lists_and_steps_per_response():
    record = {
        "problem": "p",
        "out": {"texts": ["a b", "c"], "models": ["x", "y"]},
        "steps": [["a ", "b"], ["c"]],
    }
    rows = _per_prompt(record, responses="out.texts", teacher="out.models")
    assert [(r["response"], r["teacher"], r["steps"]) for r in rows] == [
        ("a b", "x", ["a ", "b"]),
        ("c", "y", ["c"]),
    ]
    assert rows[0]["extra"] is None  # the nested lists leave nothing behind


def test_a_per_prompt_parquet_row_group_is_exploded_alike():
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([PER_PROMPT] * 3), buffer, row_group_size=2)
    names = ColumnsConfig(prompt="problem", correct="correctness_math_verify")
    rows = list(iter_parquet(io.BytesIO(buffer.getvalue()), names, layout="per_prompt"))
    assert [(r["row_number"], r["item"]) for r in rows] == [
        (number, item) for number in (1, 2, 3) for item in (0, 1)
    ]


def test_an_unknown_layout_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"input.layout must be one of \('per_trace', 'per_prompt'\)"
    ):
        load_config("default", ["input.layout=per_row"])
