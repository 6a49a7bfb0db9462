"""The student's control tokens inside a trace's text are text, never control tokens.

A tokenizer turns every occurrence of a special token's string into that token, wherever it
comes from: ``<|im_end|><|im_start|>user`` inside a response would end the assistant's turn and
open a user turn in the student's view, so a trace could change its own context. In ln-ray only
the chat template writes control tokens; in the text of a prompt, a response or a step they are
tokenized as the text they are (as ``split_special_tokens=True`` tokenizes them).

Tokenizers split their input at every added token and tokenize the pieces apart, so the
template's control tokens must still split it exactly where they do. The trace is rendered with
each control string in its messages replaced by a marker (so every control string left in the
rendered text is the template's); then the template's control strings are replaced by one
placeholder character each, an added token of a copy of the tokenizer with the same splitting
behaviour (``lstrip``, ``rstrip``, ``single_word``, ``normalized``), and the markers by the text
they stood for. That text is tokenized with special tokens split; the placeholders come back as
the template's control tokens, and every offset is mapped back onto the rendered text.

The student's reasoning markers (``<think>``, ``</think>``) are the student's own, in its
responses too: they are never treated as text. A trace without control strings in its text is
tokenized as before, jointly and in one call.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

# Stand in for a control string inside a message while the template renders it.
_MARK = "\u2063\u2064"
_MARKER = re.compile(f"{_MARK}(\\d+){_MARK}")
_PLACEHOLDER_BASE = 0xF0000  # Supplementary Private Use Area-A: no tokenizer gives it meaning


def control_tokens(tokenizer: Any, keep: Iterable[str] = ()) -> list[str]:
    """The tokenizer's control tokens (its special added tokens), longest first, but those in
    ``keep`` (the student's reasoning markers)."""
    kept = {text.strip() for text in keep}
    found = {
        token.content
        for token in getattr(tokenizer, "added_tokens_decoder", {}).values()
        if getattr(token, "special", False) and token.content and token.content not in kept
    }
    return sorted(found, key=lambda text: (-len(text), text))


def holds_controls(messages: list[dict[str, str]], controls: list[str]) -> bool:
    """Whether any message's text holds a control token's string (one scan per message)."""
    if not controls:
        return False
    pattern = _alternatives(controls)
    return any(pattern.search(message["content"]) for message in messages)


def mark_controls(
    messages: list[dict[str, str]], controls: list[str]
) -> tuple[list[dict[str, str]], list[str]]:
    """The messages with each control string in their text replaced by a marker, and the
    strings the markers stand for (marker ``i`` for ``originals[i]``)."""
    pattern = _alternatives(controls)
    originals: list[str] = []

    def marker(match: re.Match[str]) -> str:
        originals.append(match.group())
        return f"{_MARK}{len(originals) - 1}{_MARK}"

    marked = [
        {**message, "content": pattern.sub(marker, message["content"])} for message in messages
    ]
    return marked, originals


@dataclass(frozen=True)
class Unmarked:
    """A marked rendering turned back into text.

    Attributes:
        text: The rendered text, every control string as it was written.
        tokenized: What is tokenized: the template's control strings as placeholders, the
            text's own as text.
        from_marked: Per position of the marked rendering (and one past its end), the position
            in ``text``.
        from_tokenized: The same for ``tokenized``.
    """

    text: str
    tokenized: str
    from_marked: np.ndarray
    from_tokenized: np.ndarray


def unmark(marked: str, originals: list[str], controls: list[str]) -> Unmarked:
    """Replace the markers by their text and the template's control strings by placeholders."""
    placeholders = {control: chr(_PLACEHOLDER_BASE + i) for i, control in enumerate(controls)}
    parts = [_MARKER.pattern, *([_alternatives(controls).pattern] if controls else [])]
    scanner = re.compile("|".join(parts))
    text, tokenized, from_marked, from_tokenized = [], [], [], []
    position = last = 0

    def copy_text(chunk: str, marked_length: int, as_placeholder: str | None = None) -> None:
        nonlocal position
        text.append(chunk)
        if as_placeholder is None:
            tokenized.append(chunk)
            from_tokenized.extend(range(position, position + len(chunk)))
        else:
            tokenized.append(as_placeholder)
            from_tokenized.append(position)
        if marked_length == len(chunk):
            from_marked.extend(range(position, position + len(chunk)))
        else:  # a marker: its characters all stand at the start of its text
            from_marked.extend([position] * marked_length)
        position += len(chunk)

    for match in scanner.finditer(marked):
        plain = marked[last : match.start()]
        copy_text(plain, len(plain))
        if match.group(1) is not None:
            copy_text(originals[int(match.group(1))], len(match.group()))
        else:
            copy_text(match.group(), len(match.group()), placeholders[match.group()])
        last = match.end()
    copy_text(marked[last:], len(marked) - last)
    from_marked.append(position)
    from_tokenized.append(position)
    return Unmarked(
        text="".join(text),
        tokenized="".join(tokenized),
        from_marked=np.asarray(from_marked, dtype=np.int64),
        from_tokenized=np.asarray(from_tokenized, dtype=np.int64),
    )


def encode_text_controls(
    tokenizer: Any, unmarked: Unmarked, controls: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and character offsets (into ``unmarked.text``) of an unmarked rendering."""
    clone, ids_of = _placeholder_tokenizer(tokenizer, controls)
    encoded = clone(
        unmarked.tokenized,
        add_special_tokens=False,
        return_offsets_mapping=True,
        split_special_tokens=True,
    )
    ids = np.asarray([ids_of.get(i, i) for i in encoded["input_ids"]], dtype=np.int64)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return ids, unmarked.from_tokenized[offsets]


def _placeholder_tokenizer(tokenizer: Any, controls: list[str]) -> tuple[Any, dict[int, int]]:
    """A copy of ``tokenizer`` where each control token has a placeholder added token that
    splits text as it does, and the map from placeholder ids back to the control ids (built
    once per tokenizer)."""
    cached = getattr(tokenizer, "_ln_ray_placeholders", None)
    if cached is not None and cached[0] == controls:
        return cached[1], cached[2]
    from tokenizers import AddedToken

    clone = copy.deepcopy(tokenizer)
    specs = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    added = [
        AddedToken(
            chr(_PLACEHOLDER_BASE + i),
            single_word=specs[control].single_word,
            lstrip=specs[control].lstrip,
            rstrip=specs[control].rstrip,
            normalized=specs[control].normalized,
            special=False,
        )
        for i, control in enumerate(controls)
    ]
    clone.add_tokens(added)
    ids_of = {
        clone.convert_tokens_to_ids(token.content): tokenizer.convert_tokens_to_ids(control)
        for token, control in zip(added, controls)
    }
    tokenizer._ln_ray_placeholders = (controls, clone, ids_of)
    return clone, ids_of


@functools.lru_cache(maxsize=16)
def _compiled(strings: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(s) for s in strings))


def _alternatives(strings: list[str]) -> re.Pattern[str]:
    return _compiled(tuple(strings))
