"""Find a teacher's reasoning and present it in the student's own markers.

Teachers mark their reasoning in different ways: ``<think>..</think>`` (or ``<thinking>``), a
harmony-style analysis channel, a separate ``reasoning`` field, or not at all. With
``scoring.reasoning: student`` every marked reasoning is re-presented between the student's
markers (``student.reasoning_open`` / ``reasoning_close``, by default ``<think>\\n`` and
``\\n</think>\\n\\n``), so no teacher is scored on delimiters the student never produces:

    given:      <|channel|>analysis<|message|>  Let me see.  <|end|>...<|message|>  42  <|return|>
    presented:  <think>\\n                      Let me see.  \\n</think>\\n\\n       42
                open marker                    reasoning    close marker          answer

The reasoning and the answer are kept verbatim but for the whitespace that touches a marker,
which belongs to the student's markers. A reasoning given in its own field is always presented
this way (it needs some markers, and only the student's are right); with ``as_given`` a response
is otherwise scored exactly as the teacher wrote it.

Steps given with the input partition the text as given (for a separate reasoning field: the
reasoning followed by the answer); :func:`map_steps` carries them onto the presented text.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass

REASONING_MODES = ("as_given", "student")

# An opening tag (optional: templates that open the block in the generation prompt leave it out
# of the teacher's output) up to the first closing tag.
_TAGS = (("<think>", "</think>"), ("<thinking>", "</thinking>"))
_HARMONY = re.compile(
    r"\s*(?:<\|start\|>assistant)?<\|channel\|>analysis<\|message\|>"
    r"(?P<reasoning>.*?)"
    r"(?:<\|end\|>\s*(?:<\|start\|>assistant)?<\|channel\|>final<\|message\|>"
    r"(?P<answer>.*?)(?:<\|return\|>|<\|end\|>)?)?\Z",
    re.DOTALL,
)


@dataclass(frozen=True)
class ReasoningFormat:
    """How reasoning is presented to the student.

    Attributes:
        mode: ``as_given`` (score responses verbatim) or ``student`` (re-present marked
            reasoning in the student's markers).
        open: The student's opening marker, with the whitespace it writes after it.
        close: The student's closing marker, with the whitespace around it.
    """

    mode: str = "as_given"
    open: str = "<think>\n"
    close: str = "\n</think>\n\n"


@dataclass(frozen=True)
class Presented:
    """A response as it will be scored, and how its characters relate to the text as given.

    Attributes:
        text: The response as scored.
        kept: ``(source_start, source_end, start)`` per span copied from the text as given.
        opens: Per gap before ``kept[i]`` (and one after the last span), whether the text that
            replaces it is an opening marker: a step boundary inside the replaced text moves
            before an opening marker and after any other.
        source_len: The length of the text as given.
    """

    text: str
    kept: tuple[tuple[int, int, int], ...]
    opens: tuple[bool, ...]
    source_len: int


def present(response: str, reasoning: str | None, fmt: ReasoningFormat) -> Presented:
    """The response as the student will read it.

    Args:
        response: The response as given (the answer alone when ``reasoning`` is given).
        reasoning: A reasoning given in its own field, or None.
        fmt: The reasoning format.

    Returns:
        The presented response; unchanged (one kept span) when there is nothing to present.
    """
    if reasoning is not None:
        source = reasoning + response
        if reasoning.strip():
            return _assemble(source, (0, len(reasoning)), (len(reasoning), len(source)), fmt)
        return Presented(response, ((len(reasoning), len(source), 0),), (False, False), len(source))
    if fmt.mode == "student":
        spans = split_reasoning(response)
        if spans is not None:
            return _assemble(response, *spans, fmt)
    return Presented(response, ((0, len(response), 0),), (False, False), len(response))


def split_reasoning(text: str) -> tuple[tuple[int, int], tuple[int, int] | None] | None:
    """Locate the reasoning and the answer of a response whose reasoning is marked.

    Returns:
        ``((start, end) of the reasoning, (start, end) of the answer or None)`` for a response
        with marked reasoning (the answer is None when the reasoning never closes, as in a
        truncated trace), else None. The spans exclude the markers.
    """
    harmony = _HARMONY.match(text)
    if harmony:
        answer = harmony.span("answer") if harmony.group("answer") is not None else None
        return harmony.span("reasoning"), answer
    for opening, closing in _TAGS:
        body = len(text) - len(text.lstrip())
        start = body + len(opening) if text.startswith(opening, body) else None
        close = text.find(closing, start or 0)
        if close >= 0:
            return (start or 0, close), (close + len(closing), len(text))
        if start is not None:
            return (start, len(text)), None
    return None


def map_steps(steps: list[str], presented: Presented) -> list[str]:
    """Carry steps that partition the text as given onto the presented text.

    A step boundary inside kept text keeps its place; one inside replaced text (a teacher's
    marker and the whitespace around it) moves before the student's opening marker or after its
    closing marker, so markers join the steps they join in the segmenter; so does a closing
    marker inserted at a boundary (between a reasoning given apart and its answer). Steps left
    empty (a step that held only a marker's whitespace) are dropped.
    """
    if len(presented.kept) == 1 and presented.kept[0][:2] == (0, presented.source_len):
        return steps
    cuts, pos = [0], 0
    for step in steps:
        pos += len(step)
        cuts.append(_map_offset(pos, presented))
    cuts[-1] = len(presented.text)
    text = presented.text
    return [text[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _assemble(
    source: str, reasoning: tuple[int, int], answer: tuple[int, int] | None, fmt: ReasoningFormat
) -> Presented:
    """``open + reasoning + close + answer``, with the whitespace touching a marker dropped."""
    r_start, r_end = _strip_span(source, *reasoning, right=answer is not None)
    pieces, kept, opens = [fmt.open], [], [True]
    kept.append((r_start, r_end, len(fmt.open)))
    pieces.append(source[r_start:r_end])
    if answer is not None:
        a_start, a_end = _strip_span(source, *answer, right=False)
        pieces.append(fmt.close)
        opens.append(False)
        kept.append((a_start, a_end, sum(map(len, pieces))))
        pieces.append(source[a_start:a_end])
    opens.append(False)
    return Presented("".join(pieces), tuple(kept), tuple(opens), len(source))


def _strip_span(text: str, start: int, end: int, *, right: bool) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while right and end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _map_offset(pos: int, presented: Presented) -> int:
    kept = presented.kept
    index = bisect_right([span[0] for span in kept], pos) - 1
    if index >= 0:
        source_start, source_end, start = kept[index]
        if pos < source_end or (pos == source_end and source_start < source_end):
            return start + (pos - source_start)
    # In the gap before kept[index + 1] (or after the last span).
    gap = index + 1
    before = kept[index][2] + kept[index][1] - kept[index][0] if index >= 0 else 0
    after = kept[gap][2] if gap < len(kept) else len(presented.text)
    return before if presented.opens[gap] else after
