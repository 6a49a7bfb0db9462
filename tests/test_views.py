"""The student's view of a trace, for students whose templates rewrite reasoning.

Each family's template (tests/templates.py) runs on a tokenizer that knows its markers as added
tokens, as the real ones do. The generation view is checked against text built here from the
template's generation prompt and the documented rule, and the scores against the brute-force
reference on tiny random students and on SmolLM2.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_llama
from reference import assert_matches_reference, reference_scores
from templates import END_OF_TURN, FAMILIES, REASONING, TRACES

from ln_ray.config import StudentConfig, load_config
from ln_ray.prepare.reasoning import ReasoningFormat
from ln_ray.prepare.render import RenderError, RenderOptions, tokenize_trace
from ln_ray.prepare.rows import RowRejected, prepare_row
from ln_ray.score.scorer import StudentScorer
from ln_ray.score.student import check_student
from ln_ray.score.vetting import StudentError

PROMPT = "A farmer must cross a river with a wolf, a goat and a cabbage. How?"
MODES = {"as_given": ReasoningFormat(), "student": ReasoningFormat(mode="student")}
_SPECIAL = ["<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"]
_SPECIAL += ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def with_markers(tokenizer):
    """A copy of ``tokenizer`` that knows the families' role markers and the reasoning tags."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": _SPECIAL})
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


@pytest.fixture(scope="module")
def marker_tokenizer(tiny_tokenizer):
    return with_markers(tiny_tokenizer)


def templated(tokenizer, family: str):
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = FAMILIES[family]
    return tokenizer


def row(response: str) -> dict:
    return {"prompt_id": "q1", "prompt": PROMPT, "teacher": "t", "response": response}


def scored_text(family: str, response: str) -> str:
    """The documented rule: R1-distill's generation prompt opens ``<think>\\n`` itself, so a
    response opening with it meets it once; every other family scores the response whole."""
    if family == "r1_distill" and response.startswith("<think>\n"):
        return response[len("<think>\n") :]
    return response


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", sorted(TRACES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reasoning_traces_are_the_response_after_the_generation_prompt(
    marker_tokenizer, family, kind, mode
):
    tokenizer = templated(marker_tokenizer, family)
    prepared = prepare_row(row(TRACES[kind]), tokenizer, reasoning=MODES[mode])
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
    prepared = prepare_row(row(TRACES["think"]), tokenizer)
    tokens = prepared.tokens
    scored = tokenizer.decode(tokens.input_ids[tokens.prefix_len :])
    assert scored == TRACES["think"].removeprefix("<think>\n")
    assert tokenizer.decode(tokens.input_ids[: tokens.prefix_len]).endswith("<think>\n")
    assert tokenizer.decode(tokens.input_ids).count("<think>") == 1  # met once, not twice
    # rendering the whole conversation drops everything up to </think>
    with pytest.raises(RowRejected, match="alters the response text"):
        prepare_row(row(TRACES["think"]), tokenizer, render=RenderOptions(view="conversation"))


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
    thinking = prepare_row(row(TRACES["think"]), tokenizer)
    off = RenderOptions(template_kwargs={"enable_thinking": False})
    plain = prepare_row(row(TRACES["think"]), tokenizer, render=off)
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


def test_the_view_and_the_template_arguments_key_the_cache(tiny_student_dir):
    from ln_ray.io.cache import cache_key

    cfg = load_config("default", [f"student.model={tiny_student_dir}"])
    identity = check_student(cfg.student)
    key = cache_key(identity, cfg.scoring)
    for override in (
        "scoring.render=conversation",
        "scoring.reasoning=student",
        "student.template_kwargs.enable_thinking=false",
        "student.reasoning_close=</think>",
    ):
        other = load_config("default", [f"student.model={tiny_student_dir}", override])
        assert (
            cache_key(check_student(other.student, view=other.scoring.render), other.scoring) != key
        )
    # a setting that only decides which rows are scored keeps the key
    same = load_config(
        "default", [f"student.model={tiny_student_dir}", "scoring.max_response_chars=9"]
    )
    assert cache_key(check_student(same.student), same.scoring) == key


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_metric_matches_the_reference_in_the_generation_view(marker_tokenizer, family):
    tokenizer = templated(marker_tokenizer, family)
    model = make_tiny_llama(len(tokenizer), seed=3)
    ref_model = copy.deepcopy(model)
    traces = [
        prepare_row(row(text), tokenizer, reasoning=mode).tokens
        for text in TRACES.values()
        for mode in MODES.values()
    ]
    scorer = StudentScorer(model, window=1, token_budget=128)
    for trace, fast in zip(traces, scorer.score(traces), strict=True):
        assert fast.n_tokens == trace.n_response
        assert_matches_reference(fast, reference_scores(ref_model, trace, window=1))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_smollm2_scores_each_family_like_the_reference(smollm2, family):
    tokenizer = templated(with_markers(smollm2.tokenizer), family)
    model = smollm2.model
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model = copy.deepcopy(model)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    short = f"<think>\n{REASONING.splitlines()[0]}\n</think>\n\nHe crosses once."
    prepared = prepare_row(row(short), tokenizer)
    tokens = prepared.tokens
    assert tokenizer.decode(tokens.input_ids[tokens.prefix_len :]) == scored_text(family, short)
    (fast,) = StudentScorer(model, window=1, token_budget=256).score([tokens])
    with torch.no_grad():
        assert_matches_reference(fast, reference_scores(model, tokens, window=1))


_REAL = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "misguided_attention_traces.parquet"
)


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
