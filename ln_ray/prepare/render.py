"""Render a trace the way the student reads it and map its steps to token spans.

The default is the generation view: the conversation before the response, rendered with the
student's chat template and its generation prompt, then the response verbatim, as the student
would produce it, then the template's end-of-turn. The whole is tokenized once, jointly, with
character offsets. A token belongs to the response (and to a step) when its last character lies
in it:

    rendered:  <|im_start|>user ...<|im_end|> <|im_start|>assistant\n|Step one. Step two.|<|im_end|>
               (the conversation before the response + generation prompt)
    tokens:    ..........prefix (P tokens)............................| r_1  ...      r_T |  dropped
    steps:                                                            |  S_1    |  S_2   |

Tokens after the response (end-of-turn) are dropped: they are never scored and never context.
A template token the tokenizer adds whole (a role marker) stays in the prefix even when it
swallows the whitespace that starts the response (``rstrip=True``, as Phi-3's ``<|assistant|>``).

Some generation prompts open the answer themselves (R1-distill's ``<think>\n``): the text that a
generation prompt adds after the assistant header of a rendered turn. A response that opens with
that text (exactly, or the same marker after leading whitespace) meets it once: those leading
characters are read in the generation prompt, and scoring starts with the response's next token.

The conversation view (``scoring.render: conversation``) renders the whole conversation, response
included, through the template, and rejects a row whose response the template changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ln_ray.prepare.controls import (
    control_tokens,
    encode_text_controls,
    holds_controls,
    mark_controls,
    unmark,
)

VIEWS = ("generation", "conversation")
# Stands in for the response when locating it; no template has a reason to touch it.
_SENTINEL = "\u2063LN-RAY-RESPONSE\u2063"


class RenderError(ValueError):
    """The row cannot be rendered or tokenized faithfully; the message is the reject reason."""


@dataclass(frozen=True)
class TokenizedTrace:
    """A trace as token ids, with the prefix length and the steps' token boundaries.

    Attributes:
        input_ids: Prefix tokens followed by response tokens ``r_1..r_T`` (int64).
        prefix_len: ``P``, the number of tokens before ``r_1``.
        step_bounds: ``n_steps + 1`` non-decreasing indices into the response tokens; step ``i``
            owns tokens ``step_bounds[i]:step_bounds[i + 1]`` (possibly none).
    """

    input_ids: np.ndarray
    prefix_len: int
    step_bounds: np.ndarray

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.prefix_len

    @property
    def n_steps(self) -> int:
        return len(self.step_bounds) - 1


@dataclass(frozen=True)
class RenderOptions:
    """How a trace is rendered for the student.

    Attributes:
        view: ``generation`` (the default) or ``conversation``.
        template_kwargs: Extra variables for the chat template (``enable_thinking``...).
        reasoning_markers: The student's own reasoning markers: control tokens that stay
            control tokens inside a response (``controls.py``).
    """

    view: str = "generation"
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    reasoning_markers: tuple[str, ...] = ()


@dataclass(frozen=True)
class RenderedTrace:
    """Rendered text and where the scored part of the response lies in it.

    Attributes:
        text: What is tokenized: context, response, end-of-turn.
        start: Where the scored response text starts in ``text``.
        stop: Where it ends.
        skipped: Leading response characters read in the generation prompt instead.
    """

    text: str
    start: int
    stop: int
    skipped: int = 0


def render_trace(
    tokenizer: Any, messages: list[dict[str, str]], options: RenderOptions
) -> RenderedTrace:
    """Render ``messages`` (the last one the response) in the configured view.

    Raises:
        RenderError: The template fails, has no generation prompt, or (conversation view)
            changes the response text.
    """
    if options.view == "conversation":
        return render_conversation(tokenizer, messages, options.template_kwargs)
    return render_generation(tokenizer, messages, options.template_kwargs)


def render_generation(
    tokenizer: Any, messages: list[dict[str, str]], template_kwargs: Mapping[str, Any] | None = None
) -> RenderedTrace:
    """The generation view: context with the generation prompt, the response, the end-of-turn.

    The end-of-turn is what the template writes after an assistant turn (found by rendering
    the turn with a stand-in response), else the tokenizer's end-of-sequence token.

    Raises:
        RenderError: The template fails or adds no generation prompt.
    """
    context, response = messages[:-1], messages[-1]["content"]
    prompt = generation_prompt(tokenizer, context, template_kwargs)
    marked = _apply(tokenizer, [*context, {**messages[-1], "content": _SENTINEL}], template_kwargs)
    at = marked.find(_SENTINEL)
    if at >= 0:
        header, end_of_turn = marked[:at], marked[at + len(_SENTINEL) :]
        opening = prompt[len(os.path.commonprefix([prompt, header])) :]
    else:  # a template that drops or rewrites the stand-in: no turn to compare with
        end_of_turn, opening = getattr(tokenizer, "eos_token", None) or "", ""
    skipped = _met_once(opening, response)
    text = prompt + response[skipped:] + end_of_turn
    return RenderedTrace(text, len(prompt), len(prompt) + len(response) - skipped, skipped)


def generation_prompt(
    tokenizer: Any, context: list[dict[str, str]], template_kwargs: Mapping[str, Any] | None = None
) -> str:
    """``context`` rendered with the template's generation prompt.

    Raises:
        RenderError: The template fails, or its generation prompt adds nothing (the student
            would answer without an assistant header).
    """
    prompt = _apply(tokenizer, context, template_kwargs, add_generation_prompt=True)
    if prompt == _apply(tokenizer, context, template_kwargs):
        raise RenderError(
            "chat template has no generation prompt (set student.chat_template to one that "
            "has, or scoring.render=conversation)"
        )
    return prompt


def context_text(
    tokenizer: Any, context: list[dict[str, str]], template_kwargs: Mapping[str, Any] | None = None
) -> str:
    """``context`` rendered by the template without a generation prompt (what the generation
    view's prompt adds to is shown apart by ``ln-ray inspect``).

    Raises:
        RenderError: The template fails.
    """
    return _apply(tokenizer, context, template_kwargs)


def unconditional_context(
    tokenizer: Any, template_kwargs: Mapping[str, Any] | None = None
) -> np.ndarray:
    """What the student has before a response when it is given no prompt, for IFD: the chat
    template rendered for one empty user turn with its generation prompt (so the response
    follows the same assistant header and opening as in its conversation), tokenized as a
    rendered context is; where the template refuses that, the tokenizer's BOS token alone; where
    it has none, nothing.

    Returns:
        The context's token ids (int64; possibly empty).
    """
    try:
        text = generation_prompt(tokenizer, [{"role": "user", "content": ""}], template_kwargs)
    except RenderError:
        bos = getattr(tokenizer, "bos_token_id", None)
        return np.asarray([] if bos is None else [bos], dtype=np.int64)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def render_conversation(
    tokenizer: Any, messages: list[dict[str, str]], template_kwargs: Mapping[str, Any] | None = None
) -> RenderedTrace:
    """The conversation view: the whole conversation rendered, the response located in it.

    Raises:
        RenderError: The template fails or changes the response text.
    """
    response = messages[-1]["content"]
    probe = [*messages[:-1], {**messages[-1], "content": _SENTINEL}]
    text = _apply(tokenizer, messages, template_kwargs)
    marked = _apply(tokenizer, probe, template_kwargs)
    start = marked.find(_SENTINEL)
    stop = start + len(response)
    tail = marked[start + len(_SENTINEL) :]
    faithful = (
        start >= 0
        and text[:start] == marked[:start]
        and text[start:stop] == response
        and text[stop:] == tail
    )
    if not faithful:
        stripped = response.strip()
        if start >= 0 and text[:start] + stripped + tail == text:
            # Llama-3.x templates render ``message['content'] | trim``.
            raise RenderError(
                "chat template alters the response text: it trims leading and trailing "
                "whitespace (use scoring.render=generation, strip the responses, or set "
                "student.chat_template to a template that keeps it)"
            )
        raise RenderError("chat template alters the response text (use scoring.render=generation)")
    return RenderedTrace(text, start, stop)


def tokenize_trace(
    tokenizer: Any,
    messages: list[dict[str, str]],
    steps: list[str],
    options: RenderOptions | None = None,
) -> TokenizedTrace:
    """Render, tokenize once with offsets, and map response tokens to steps.

    Args:
        tokenizer: A fast Hugging Face tokenizer with a chat template.
        messages: Chat messages; the last one's content is the response.
        steps: A partition of the response text (their concatenation is the response).
        options: The view and the template's arguments (default: the generation view).

    Returns:
        The tokenized trace. Steps that lie wholly in text read in the generation prompt own
        no tokens.

    Raises:
        RenderError: The template cannot render the trace faithfully, or the response owns no
            tokens.
    """
    options = options or RenderOptions()
    rendered, ids, offsets = _render_and_encode(tokenizer, messages, options)
    start, stop = rendered.start, rendered.stop
    # A token's last character; tokens with an empty span (some special tokens) own no character.
    last_char = np.where(offsets[:, 1] > offsets[:, 0], offsets[:, 1] - 1, -1)
    # An added token that starts before the response is the template's, whatever it swallowed.
    added = np.isin(ids, list(getattr(tokenizer, "added_tokens_decoder", {})))
    in_response = (last_char >= start) & (last_char < stop) & ~(added & (offsets[:, 0] < start))
    where = np.flatnonzero(in_response)
    if len(where) == 0:
        raise RenderError("response has no tokens of its own")
    first, last = int(where[0]), int(where[-1])
    if last - first + 1 != len(where):
        raise RenderError("response tokens are not contiguous")
    if first == 0:
        raise RenderError("nothing precedes the response to condition on")
    # Step ends in the coordinates of the scored text (which starts ``skipped`` characters in).
    step_ends = np.cumsum([len(step) for step in steps]) - rendered.skipped
    step_of_token = np.searchsorted(step_ends, last_char[first : last + 1] - start, side="right")
    bounds = np.searchsorted(step_of_token, np.arange(len(steps) + 1), side="left")
    return TokenizedTrace(
        input_ids=ids[: last + 1],
        prefix_len=first,
        step_bounds=bounds.astype(np.int64),
    )


def _render_and_encode(
    tokenizer: Any, messages: list[dict[str, str]], options: RenderOptions
) -> tuple[RenderedTrace, np.ndarray, np.ndarray]:
    """The rendered trace, its token ids and their character offsets; control tokens in the
    messages' text are tokenized as text (``controls.py``)."""
    controls = control_tokens(tokenizer, options.reasoning_markers)
    if not holds_controls(messages, controls):
        rendered = render_trace(tokenizer, messages, options)
        encoded = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        return rendered, ids, offsets
    marked_messages, originals = mark_controls(messages, controls)
    marked = render_trace(tokenizer, marked_messages, options)
    unmarked = unmark(marked.text, originals, controls)
    ids, offsets = encode_text_controls(tokenizer, unmarked, controls)
    where = unmarked.from_marked
    # The characters read in the generation prompt hold no control string (a marker would not
    # match the prompt's opening), so the marked response skips as many.
    rendered = RenderedTrace(
        unmarked.text, int(where[marked.start]), int(where[marked.stop]), marked.skipped
    )
    return rendered, ids, offsets


def _met_once(opening: str, response: str) -> int:
    """How many leading response characters the generation prompt's own opening already holds."""
    if not opening.strip():
        return 0
    if response.startswith(opening):
        return len(opening)
    marker, body = opening.strip(), response.lstrip()
    if body.startswith(marker):
        return len(response) - len(body) + len(marker)
    return 0


def _apply(
    tokenizer: Any,
    messages: list[dict[str, str]],
    template_kwargs: Mapping[str, Any] | None,
    *,
    add_generation_prompt: bool = False,
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **(template_kwargs or {}),
        )
    except Exception as exc:  # Jinja errors come in many types.
        raise RenderError(f"chat template failed: {exc}") from None
