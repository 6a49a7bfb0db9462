"""Render a conversation with the student's chat template and map its steps to token spans.

The whole conversation is tokenized once, jointly, with character offsets, exactly as the student
would read it. A token belongs to the response (and to a step) when its last character lies in it:

    rendered:  <|im_start|>user ...<|im_end|> <|im_start|>assistant |Step one. Step two.|<|im_end|>
    tokens:    ..........prefix (P tokens)..........................| r_1  ...      r_T |  dropped
    steps:                                                          |  S_1    |  S_2   |

Tokens after the response (end-of-turn) are dropped: they are never scored and never context.
A template token the tokenizer adds whole (a role marker) stays in the prefix even when it
swallows the whitespace that starts the response (``rstrip=True``, as Phi-3's ``<|assistant|>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

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


def render_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, int, int]:
    """Render ``messages`` (the last one the response) and locate the response in the text.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.
        messages: Chat messages; the last is the assistant response being scored.

    Returns:
        ``(text, start, stop)`` with ``text[start:stop]`` equal to the response.

    Raises:
        RenderError: The template fails or changes the response text.
    """
    response = messages[-1]["content"]
    probe = [*messages[:-1], {**messages[-1], "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        marked = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception as exc:  # Jinja errors come in many types.
        raise RenderError(f"chat template failed: {exc}") from None
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
                "whitespace (strip the responses, or set student.chat_template to a template "
                "that keeps it)"
            )
        raise RenderError("chat template alters the response text")
    return text, start, stop


def tokenize_trace(
    tokenizer: Any, messages: list[dict[str, str]], steps: list[str]
) -> TokenizedTrace:
    """Render, tokenize once with offsets, and map response tokens to steps.

    Args:
        tokenizer: A fast Hugging Face tokenizer with a chat template.
        messages: Chat messages; the last one's content is the response.
        steps: A partition of the response text (their concatenation is the response).

    Returns:
        The tokenized trace.

    Raises:
        RenderError: The template alters the response, or the response owns no tokens.
    """
    text, start, stop = render_conversation(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
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
    step_ends = np.cumsum([len(step) for step in steps])
    step_of_token = np.searchsorted(step_ends, last_char[first : last + 1] - start, side="right")
    bounds = np.searchsorted(step_of_token, np.arange(len(steps) + 1), side="left")
    return TokenizedTrace(
        input_ids=ids[: last + 1],
        prefix_len=first,
        step_bounds=bounds.astype(np.int64),
    )
