"""Row validation, chat rendering, joint tokenization and step-to-token mapping."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from ln_ray.prepare.render import RenderError, RenderOptions, tokenize_trace
from ln_ray.prepare.rows import RowRejected, prepare_row, trace_id, validate_row

RESPONSE = "First, compute the total cost. 3 apples at $2 each is 6 dollars.\nSo the answer is 6."
ROW = {"prompt_id": "q1", "prompt": "What is the total?", "teacher": "t1", "response": RESPONSE}


def _owner_steps(tokenizer, trace, messages, steps):
    """Recompute, token by token, which step holds each response token's last character."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    start = text.rindex(messages[-1]["content"])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = np.cumsum([len(s) for s in steps])
    owners = []
    for _, b in enc["offset_mapping"][trace.prefix_len : len(trace.input_ids)]:
        owners.append(int(np.searchsorted(ends, b - 1 - start, side="right")))
    return owners


def test_response_tokens_and_step_spans(tiny_tokenizer):
    steps = [
        "First, compute the total cost. ",
        "3 apples at $2 each is 6 dollars.\n",
        "So the answer is 6.",
    ]
    messages = [
        {"role": "user", "content": "What is the total?"},
        {"role": "assistant", "content": RESPONSE},
    ]
    trace = tokenize_trace(tiny_tokenizer, messages, steps)
    assert tiny_tokenizer.decode(trace.input_ids[trace.prefix_len :]) == RESPONSE
    assert tiny_tokenizer.decode(trace.input_ids[: trace.prefix_len]).endswith("assistant\n")
    bounds = trace.step_bounds
    assert bounds[0] == 0 and bounds[-1] == trace.n_response and trace.n_steps == 3
    owners = _owner_steps(tiny_tokenizer, trace, messages, steps)
    expected = np.repeat(np.arange(3), np.diff(bounds)).tolist()
    assert owners == expected


def test_a_step_inside_one_token_owns_no_tokens(tiny_tokenizer):
    response = "First, compute the total cost."
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": response}]
    whole = tokenize_trace(tiny_tokenizer, messages, [response])
    pieces = [tiny_tokenizer.decode([t]) for t in whole.input_ids[whole.prefix_len :]]
    index = next(i for i, piece in enumerate(pieces) if len(piece) >= 3)
    cut = len("".join(pieces[:index])) + 1
    # a step that starts and ends inside one token holds none of its tokens' last characters
    steps = [response[:cut], response[cut : cut + 1], response[cut + 1 :]]
    trace = tokenize_trace(tiny_tokenizer, messages, steps)
    assert trace.step_bounds.tolist() == [0, index, index, trace.n_response]


def test_template_that_alters_the_response_is_rejected_in_the_conversation_view(tiny_tokenizer):
    tokenizer = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    conversation = RenderOptions(view="conversation")
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Answer.\n\n"}]
    with pytest.raises(RenderError, match="alters the response") as trimmed:
        tokenize_trace(tokenizer, messages, ["Answer.\n\n"], conversation)
    # The reason says what to do about a trimming template.
    assert "trims leading and trailing whitespace" in str(trimmed.value)
    assert "scoring.render=generation" in str(trimmed.value)
    row = {**ROW, "response": "Answer.\n\n"}
    with pytest.raises(RowRejected, match="alters the response text: it trims"):
        prepare_row(row, tokenizer, render=conversation)
    # The generation view scores the response as written.
    trace = prepare_row(row, tokenizer).tokens
    assert tokenizer.decode(trace.input_ids[trace.prefix_len :]) == "Answer.\n\n"
    # A response without surrounding whitespace renders faithfully.
    prepare_row({**ROW, "response": "Answer."}, tokenizer, render=conversation)
    # Any other change keeps the plain reason.
    tokenizer.chat_template = tokenizer.chat_template.replace("| trim", "| upper")
    with pytest.raises(RowRejected, match=r"alters the response text \(use scoring"):
        prepare_row({**ROW, "response": "Answer."}, tokenizer, render=conversation)


def test_given_messages_with_a_system_turn(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the total?"},
        {"role": "assistant", "content": RESPONSE},
    ]
    prepared = prepare_row({"teacher": "t1", "messages": messages, "prompt_id": 7}, tiny_tokenizer)
    assert prepared.row.prompt == "What is the total?"
    assert prepared.row.prompt_id == "7"
    assert (
        tiny_tokenizer.decode(prepared.tokens.input_ids[: prepared.tokens.prefix_len]).count(
            "Be brief."
        )
        == 1
    )


def test_input_steps_win_over_the_segmenter(tiny_tokenizer):
    steps = [
        "First, compute the total cost. 3 apples at $2 each is 6 dollars.\n",
        "So the answer is 6.",
    ]
    prepared = prepare_row({**ROW, "steps": steps}, tiny_tokenizer)
    assert prepared.tokens.n_steps == 2
    segmented = prepare_row(ROW, tiny_tokenizer)
    assert segmented.tokens.n_steps == 3
    assert segmented.trace_id != prepared.trace_id  # different steps, different scores
    # steps without a response (step-annotated datasets): the response is their concatenation
    steps_only = prepare_row({**ROW, "response": None, "steps": steps}, tiny_tokenizer)
    assert steps_only.row.response == "".join(steps) and steps_only.tokens.n_steps == 2
    assert steps_only.trace_id == prepared.trace_id


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"teacher": None}, "missing teacher"),
        ({"prompt": 3}, "prompt is not a string"),
        ({"response": "   "}, "empty response"),
        ({"response": "x" * 101}, "longer than 100"),
        ({"steps": ["First, compute", " something else"]}, "bad steps"),
        ({"correct": "yes"}, "correct is not a boolean"),
        ({"messages": "[not json"}, "not valid JSON"),
        ({"messages": "[" * 100_000 + "]" * 100_000}, "not valid JSON"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "not the assistant"),
    ],
)
def test_validation_reasons(change, reason):
    with pytest.raises(RowRejected, match=reason):
        validate_row({**ROW, **change}, max_response_chars=100)


def test_trace_id_is_stable_and_content_addressed():
    a = validate_row(ROW, 10_000)
    b = validate_row({**ROW, "teacher": "t2"}, 10_000)
    assert trace_id(a) == trace_id(validate_row(dict(ROW), 10_000))
    assert trace_id(a) != trace_id(b)
    # the steps are part of it: given ones, or the segmenter settings that will cut them
    stepped = validate_row({**ROW, "steps": [RESPONSE]}, 10_000)
    assert len({trace_id(a), trace_id(a, "line"), trace_id(a, min_step_chars=2)}) == 3
    assert trace_id(stepped) == trace_id(stepped, "line") != trace_id(a)


@pytest.mark.slow
def test_smollm2_chat_template_spans(smollm2):
    tokenizer = smollm2.tokenizer
    prepared = prepare_row(ROW, tokenizer)
    tokens = prepared.tokens
    assert tokenizer.decode(tokens.input_ids[tokens.prefix_len :]) == RESPONSE
    prefix = tokenizer.decode(tokens.input_ids[: tokens.prefix_len])
    assert prefix.startswith("<|im_start|>system") and prefix.endswith("<|im_start|>assistant\n")


def test_a_role_token_that_swallows_leading_whitespace_stays_in_the_prefix(tiny_tokenizer):
    from tokenizers import AddedToken

    # Phi-3 style: role markers strip the whitespace after them, and the template puts the
    # response right after "<|assistant|>\n".
    tokenizer = copy.deepcopy(tiny_tokenizer)
    markers = [
        AddedToken(f"<|{name}|>", rstrip=True, special=True, normalized=False)
        for name in ("user", "assistant", "end")
    ]
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    for response in ["The answer is 42.", "\nThe answer is 42.", " \n The answer is 42."]:
        steps = [response[:-4], response[-4:]]
        messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": response}]
        trace = tokenize_trace(tokenizer, messages, steps)
        assert trace.input_ids[trace.prefix_len - 1] == assistant
        assert tokenizer.decode(trace.input_ids[trace.prefix_len :]) == "The answer is 42."
        owners = _owner_steps(tokenizer, trace, messages, steps)
        assert owners == np.repeat(np.arange(2), np.diff(trace.step_bounds)).tolist()
        assert trace.step_bounds.tolist() == [0, 3, trace.n_response]
