"""Teachers' reasoning in any marking, presented in the student's own markers
(ln_ray/prepare/reasoning.py, and its columns in ln_ray/prepare/rows.py)."""

from __future__ import annotations

import pytest

from ln_ray.prepare.reasoning import ReasoningFormat, map_steps, present, split_reasoning
from ln_ray.prepare.rows import RowRejected, prepare_row, present_row, trace_id, validate_row
from tests.templates import ANSWER, REASONING, TRACES

STUDENT = ReasoningFormat(mode="student")
AS_GIVEN = ReasoningFormat()
PRESENTED = f"<think>\n{REASONING.strip()}\n</think>\n\n{ANSWER}"


@pytest.mark.parametrize(
    "kind, reasoning, answer",
    [
        ("think", f"\n{REASONING}", f"\n\n{ANSWER}"),
        ("think_extra_newlines", f"\n\n{REASONING}\n", f"\n\n\n\n{ANSWER}"),
        ("think_unclosed", f"\n{REASONING}", None),
        ("close_only", REASONING, f"\n\n{ANSWER}"),
        ("harmony", REASONING, ANSWER),
    ],
)
def test_split_reasoning_finds_each_marking(kind, reasoning, answer):
    text = TRACES[kind]
    found_reasoning, found_answer = split_reasoning(text)
    assert text[slice(*found_reasoning)] == reasoning
    assert (text[slice(*found_answer)] if found_answer else None) == answer


def test_split_reasoning_other_markings():
    assert split_reasoning(TRACES["plain"]) is None
    text = "  <thinking>Hmm.</thinking>Yes."
    reasoning, answer = split_reasoning(text)
    assert (text[slice(*reasoning)], text[slice(*answer)]) == ("Hmm.", "Yes.")
    unclosed = "<|channel|>analysis<|message|>Still thinking"
    reasoning, answer = split_reasoning(unclosed)
    assert unclosed[slice(*reasoning)] == "Still thinking" and answer is None


@pytest.mark.parametrize("kind", ["think", "think_extra_newlines", "close_only", "harmony"])
def test_every_marking_presents_as_the_students(kind):
    assert present(TRACES[kind], None, STUDENT).text == PRESENTED
    # as given, the response is scored as the teacher wrote it
    assert present(TRACES[kind], None, AS_GIVEN).text == TRACES[kind]


def test_presentation_edge_cases():
    assert present(TRACES["plain"], None, STUDENT).text == TRACES["plain"]
    unclosed = present(TRACES["think_unclosed"], None, STUDENT).text
    assert unclosed == f"<think>\n{REASONING}"  # a truncated reasoning stays open, as it ends
    own = ReasoningFormat(mode="student", open="<reason>", close="</reason>")
    assert present(TRACES["harmony"], None, own).text == (
        f"<reason>{REASONING.strip()}</reason>{ANSWER}"
    )
    # a reasoning given apart is always presented in the student's markers
    for fmt in (AS_GIVEN, STUDENT):
        assert present(ANSWER, REASONING, fmt).text == PRESENTED
    assert present(ANSWER, " \n", AS_GIVEN).text == ANSWER


def test_steps_are_carried_onto_the_presented_text():
    given = "<think>\n\nA one. A two.\n\n</think>\n\n\nThe end."
    steps = ["<think>\n\nA one. ", "A two.\n\n</think>\n\n\n", "The end."]
    presented = present(given, None, STUDENT)
    assert presented.text == "<think>\nA one. A two.\n</think>\n\nThe end."
    mapped = map_steps(steps, presented)
    assert "".join(mapped) == presented.text
    # boundaries in kept text keep their place; the close marker joins the step before it
    assert mapped == ["<think>\nA one. ", "A two.\n</think>\n\n", "The end."]
    # a boundary right after the teacher's opening marker leaves the student's on its own
    steps = ["<think>\n\n", "A one. A two.", "\n\n</think>\n\n\nThe end."]
    mapped = map_steps(steps, presented)
    assert mapped == ["<think>\n", "A one. A two.", "\n</think>\n\nThe end."]
    # a step that held only a marker's whitespace is dropped
    steps = ["<think>\n", "\n", "A one. A two.\n\n</think>\n\n\nThe end."]
    assert map_steps(steps, presented) == ["<think>\n", "A one. A two.\n</think>\n\nThe end."]


def test_step_mapping_keeps_every_boundary_in_kept_text():
    import random

    rng = random.Random(0)
    for kind, text in TRACES.items():
        presented = present(text, None, STUDENT)
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(text)), 4))
            steps = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            mapped = map_steps(steps, presented)
            assert "".join(mapped) == presented.text and all(mapped), kind
            new_cuts, pos = set(), 0
            for step in mapped:
                pos += len(step)
                new_cuts.add(pos)
            for cut in cuts:
                for start, stop, new_start in presented.kept:
                    if start < cut < stop:
                        assert new_start + cut - start in new_cuts, (kind, cut)


def test_rows_take_reasoning_from_a_column_or_the_message(tiny_tokenizer):
    base = {"prompt_id": "q", "prompt": "Cross?", "teacher": "t"}
    by_column = prepare_row({**base, "response": ANSWER, "reasoning": REASONING}, tiny_tokenizer)
    messages = [
        {"role": "user", "content": "Cross?"},
        {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING},
    ]
    by_message = prepare_row({**base, "messages": messages}, tiny_tokenizer)
    inline = prepare_row({**base, "response": TRACES["think"]}, tiny_tokenizer, reasoning=STUDENT)
    for prepared in (by_column, by_message, inline):
        assert prepared.row.response == PRESENTED
        assert prepared.row.reasoning is None
    # one trace, however it was given: one trace_id, one cache entry
    assert by_column.trace_id == by_message.trace_id == inline.trace_id


def test_steps_with_a_separate_reasoning_partition_reasoning_then_answer():
    row = {
        "prompt": "Cross?",
        "teacher": "t",
        "reasoning": "Wait. Think.",
        "response": "Yes.",
        "steps": ["Wait. ", "Think.", "Yes."],
    }
    presented = present_row(validate_row(row, 1000), STUDENT)
    assert presented.response == "<think>\nWait. Think.\n</think>\n\nYes."
    # the student's closing marker, inserted between two steps, closes the step before it
    assert presented.steps == ["<think>\nWait. ", "Think.\n</think>\n\n", "Yes."]
    with pytest.raises(RowRejected, match="bad steps"):
        validate_row({**row, "steps": ["Yes."]}, 1000)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"reasoning": 3}, "reasoning is not a string"),
        ({"reasoning": "x" * 90}, "longer than 100"),
        (
            {
                "reasoning": "A",
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "B", "reasoning_content": "C"},
                ],
            },
            "reasoning differs",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "B", "reasoning_content": 4},
                ]
            },
            "reasoning_content is not a string",
        ),  # fmt: skip
    ],
)
def test_reasoning_validation(change, reason):
    row = {"prompt": "Q", "teacher": "t", "response": "B" * 20, **change}
    if "messages" in change:
        del row["response"]
    with pytest.raises(RowRejected, match=reason):
        validate_row(row, max_response_chars=100)


def test_a_reasoning_alone_is_a_response():
    row = validate_row({"prompt": "Q", "teacher": "t", "response": "", "reasoning": "Hmm."}, 100)
    assert present_row(row, AS_GIVEN).response == "<think>\nHmm.\n</think>\n\n"
    with pytest.raises(RowRejected, match="empty response"):
        validate_row({"prompt": "Q", "teacher": "t", "response": " ", "reasoning": " "}, 100)


def test_steps_without_a_response_are_the_response():
    steps = ["First, add. ", "Then stop."]
    row = validate_row({"prompt": "Q", "teacher": "t", "steps": steps}, 1000)
    assert row.response == "First, add. Then stop." and row.steps == steps
    same = validate_row({"prompt": "Q", "teacher": "t", "steps": steps, "response": None}, 1000)
    assert trace_id(row) == trace_id(same)
