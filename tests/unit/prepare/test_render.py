"""Chat rendering and joint tokenization (ln_ray/prepare/render.py): step-to-token mapping, and the
student's generation view for templates that rewrite reasoning.

Each family's template (tests/templates.py) runs on a tokenizer that knows its markers as added
tokens, as the real ones do. The generation view is checked against text built here from the
template's generation prompt and the documented rule."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from ln_ray.config import StudentConfig, load_config
from ln_ray.prepare.render import (
    RenderError,
    RenderOptions,
    tokenize_trace,
    unconditional_context,
)
from ln_ray.prepare.rows import RowRejected, prepare_row
from ln_ray.score.student import check_student
from ln_ray.score.vetting import StudentError
from tests.helpers import REPO, TOTAL_RESPONSE, TOTAL_ROW
from tests.templates import (
    END_OF_TURN,
    FAMILIES,
    MODES,
    PROMPT,
    TRACES,
    scored_text,
    templated,
    trace_row,
    with_markers,
)


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
        {"role": "assistant", "content": TOTAL_RESPONSE},
    ]
    trace = tokenize_trace(tiny_tokenizer, messages, steps)
    assert tiny_tokenizer.decode(trace.input_ids[trace.prefix_len :]) == TOTAL_RESPONSE
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
    row = {**TOTAL_ROW, "response": "Answer.\n\n"}
    with pytest.raises(RowRejected, match="alters the response text: it trims"):
        prepare_row(row, tokenizer, render=conversation)
    # The generation view scores the response as written.
    trace = prepare_row(row, tokenizer).tokens
    assert tokenizer.decode(trace.input_ids[trace.prefix_len :]) == "Answer.\n\n"
    # A response without surrounding whitespace renders faithfully.
    prepare_row({**TOTAL_ROW, "response": "Answer."}, tokenizer, render=conversation)
    # Any other change keeps the plain reason.
    tokenizer.chat_template = tokenizer.chat_template.replace("| trim", "| upper")
    with pytest.raises(RowRejected, match=r"alters the response text \(use scoring"):
        prepare_row({**TOTAL_ROW, "response": "Answer."}, tokenizer, render=conversation)


def test_given_messages_with_a_system_turn(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the total?"},
        {"role": "assistant", "content": TOTAL_RESPONSE},
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
    prepared = prepare_row({**TOTAL_ROW, "steps": steps}, tiny_tokenizer)
    assert prepared.tokens.n_steps == 2
    segmented = prepare_row(TOTAL_ROW, tiny_tokenizer)
    assert segmented.tokens.n_steps == 3
    assert segmented.trace_id != prepared.trace_id  # different steps, different scores
    # steps without a response (step-annotated datasets): the response is their concatenation
    steps_only = prepare_row({**TOTAL_ROW, "response": None, "steps": steps}, tiny_tokenizer)
    assert steps_only.row.response == "".join(steps) and steps_only.tokens.n_steps == 2
    assert steps_only.trace_id == prepared.trace_id


@pytest.mark.slow
def test_smollm2_chat_template_spans(smollm2):
    tokenizer = smollm2.tokenizer
    prepared = prepare_row(TOTAL_ROW, tokenizer)
    tokens = prepared.tokens
    assert tokenizer.decode(tokens.input_ids[tokens.prefix_len :]) == TOTAL_RESPONSE
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


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", sorted(TRACES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reasoning_traces_are_the_response_after_the_generation_prompt(
    marker_tokenizer, family, kind, mode
):
    tokenizer = templated(marker_tokenizer, family)
    prepared = prepare_row(trace_row(TRACES[kind]), tokenizer, reasoning=MODES[mode])
    tokens = prepared.tokens
    response = prepared.row.response
    context = [{"role": "user", "content": PROMPT}]
    prompt = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
    text = scored_text(family, response)
    joint = tokenizer(prompt + text + END_OF_TURN[family], add_special_tokens=False)["input_ids"]
    assert tokens.input_ids.tolist() == joint[: len(tokens.input_ids)]
    assert tokenizer.decode(tokens.input_ids[: tokens.prefix_len]) == prompt
    assert tokenizer.decode(tokens.input_ids[tokens.prefix_len :]) == text
    if kind != "plain":  # every marked reasoning is scored, none dropped
        assert "the farmer has a wolf" in text
    if mode == "student" and kind not in ("think_unclosed", "plain"):
        assert response.startswith("<think>\n") and "\n</think>\n\n" in response


def test_r1_distill_scores_the_reasoning_the_conversation_view_loses(marker_tokenizer):
    tokenizer = templated(marker_tokenizer, "r1_distill")
    prepared = prepare_row(trace_row(TRACES["think"]), tokenizer)
    tokens = prepared.tokens
    scored = tokenizer.decode(tokens.input_ids[tokens.prefix_len :])
    assert scored == TRACES["think"].removeprefix("<think>\n")
    assert tokenizer.decode(tokens.input_ids[: tokens.prefix_len]).endswith("<think>\n")
    assert tokenizer.decode(tokens.input_ids).count("<think>") == 1  # met once, not twice
    # rendering the whole conversation drops everything up to </think>
    with pytest.raises(RowRejected, match="alters the response text"):
        conversation = RenderOptions(view="conversation")
        prepare_row(trace_row(TRACES["think"]), tokenizer, render=conversation)


@pytest.mark.parametrize(
    "response, scored",
    [
        ("<think>\nHmm. Yes.", "Hmm. Yes."),
        ("<think>\n\nHmm. Yes.", "\nHmm. Yes."),
        ("<think>Hmm. Yes.", "Hmm. Yes."),  # the same marker, other whitespace
        ("\n<think>\nHmm. Yes.", "\nHmm. Yes."),
        ("Hmm. Yes.", "Hmm. Yes."),  # no marker: all of it is scored, after the opening
    ],
)
def test_an_opening_in_the_generation_prompt_meets_the_response_once(
    marker_tokenizer, response, scored
):
    tokenizer = templated(marker_tokenizer, "r1_distill")
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": response}]
    steps = [response[: response.index("Hmm")], response[response.index("Hmm") :]]
    tokens = tokenize_trace(tokenizer, messages, [s for s in steps if s])
    assert tokenizer.decode(tokens.input_ids[tokens.prefix_len :]) == scored
    if steps[0] and scored.startswith("Hmm"):  # a step that lies in the prompt owns no tokens
        assert tokens.step_bounds.tolist() == [0, 0, tokens.n_response]
    # ChatML's generation prompt opens nothing: a leading newline is the response's own
    chatml = templated(marker_tokenizer, "chatml")
    messages[-1]["content"] = "\nHmm. Yes."
    tokens = tokenize_trace(chatml, messages, ["\nHmm. Yes."])
    assert chatml.decode(tokens.input_ids[tokens.prefix_len :]) == "\nHmm. Yes."


def test_template_arguments_reach_the_template(marker_tokenizer):
    tokenizer = templated(marker_tokenizer, "qwen3")
    thinking = prepare_row(trace_row(TRACES["think"]), tokenizer)
    off = RenderOptions(template_kwargs={"enable_thinking": False})
    plain = prepare_row(trace_row(TRACES["think"]), tokenizer, render=off)
    assert not tokenizer.decode(thinking.tokens.input_ids).count("</think>\n\n<think>")
    prefix = tokenizer.decode(plain.tokens.input_ids[: plain.tokens.prefix_len])
    assert prefix.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert plain.tokens.n_response == thinking.tokens.n_response
    cfg = load_config("default", ["student.template_kwargs.enable_thinking=false"])
    assert cfg.student.template_kwargs == {"enable_thinking": False}


def test_a_template_without_a_generation_prompt_is_refused(marker_tokenizer, tiny_student_dir):
    template = FAMILIES["chatml"].split("{% if add_generation_prompt %}")[0]
    tokenizer = copy.copy(marker_tokenizer)
    tokenizer.chat_template = template
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "Yes."}]
    with pytest.raises(RenderError, match="no generation prompt"):
        tokenize_trace(tokenizer, messages, ["Yes."])
    tokenize_trace(tokenizer, messages, ["Yes."], RenderOptions(view="conversation"))
    student = StudentConfig(model=tiny_student_dir, chat_template=template)
    with pytest.raises(StudentError, match="no generation prompt"):
        check_student(student)
    check_student(student, view="conversation")


_REAL = REPO.parent / "shared" / "data" / "misguided_attention_traces.parquet"


@pytest.mark.slow
@pytest.mark.skipif(not _REAL.exists(), reason="the real multi-teacher traces are not here")
def test_real_reasoning_traces_render_for_every_family(smollm2):
    """Real traces from ten reasoning teachers, on SmolLM2's tokenizer: none is rejected in the
    generation view, where the conversation view rejects nearly all for R1 and Qwen3."""
    import pyarrow.parquet as pq

    rows = pq.read_table(_REAL).to_pylist()[::40]
    tokenizer = with_markers(smollm2.tokenizer)
    conversation = RenderOptions(view="conversation")
    for family in sorted(FAMILIES):
        tokenizer.chat_template = FAMILIES[family]
        for mode in MODES.values():
            for raw in rows:
                prepared = prepare_row(raw, tokenizer, reasoning=mode)
                assert prepared.tokens.n_response > 100
        if family in ("r1_distill", "qwen3"):
            rejected = 0
            for raw in rows:
                try:
                    prepare_row(raw, tokenizer, render=conversation)
                except RowRejected:
                    rejected += 1
            assert rejected >= len(rows) * 0.8


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_unconditional_context_is_the_template_for_an_empty_user_turn(marker_tokenizer, family):
    """IFD's no-prompt context ends as the trace's own prefix does: the assistant header and the
    generation prompt's opening (R1-distill's <think>), tokenized as a rendered context is."""
    tokenizer = templated(marker_tokenizer, family)
    empty = tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True
    )
    context = unconditional_context(tokenizer)
    assert context.tolist() == tokenizer(empty, add_special_tokens=False)["input_ids"]
    trace = tokenize_trace(
        tokenizer,
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "It works."}],
        ["It works."],
    )
    assert context[-1] == trace.input_ids[trace.prefix_len - 1]


def test_a_template_that_refuses_an_empty_turn_leaves_the_bos_token_or_nothing(marker_tokenizer):
    tokenizer = copy.copy(marker_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if not m['content'] %}"
        "{{ raise_exception('empty message') }}{% endif %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer.bos_token = "<|im_start|>"
    assert unconditional_context(tokenizer).tolist() == [tokenizer.bos_token_id]
    tokenizer.bos_token = None
    assert unconditional_context(tokenizer).tolist() == []
