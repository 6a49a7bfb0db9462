"""Split a reasoning response into steps whose concatenation is exactly the response.

Steps are slices of the text between cut positions, so no character is ever lost, duplicated or
moved. Whitespace after a sentence stays with it: the cut falls at the end of the run, or after
its last newline when it holds one, so the next line's indentation opens the next step.

``sentence`` mode (the default) cuts after sentence punctuation and at every line break, except
inside protected spans: fenced code, inline code and math (``$$..$$``, ``\\[..\\]``, ``\\(..\\)``,
``$..$``). A display-math block or code fence on its own lines therefore becomes its own step,
while one written inside a line stays with that line's sentence. ``<think>`` joins the step that
follows it and ``</think>`` closes the step that precedes it.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable

SEGMENT_MODES = ("sentence", "line", "paragraph")

# A newline run: one newline plus any blank (possibly space-filled) lines after it.
_LINE_RUN = re.compile(r"\n(?:[^\S\n]*\n)*")
_PARA_RUN = re.compile(r"\n(?:[^\S\n]*\n)+")
# Sentence ends inside a line; ends followed by a newline are left to _LINE_RUN. CJK text puts
# no space after its full stop, so CJK punctuation needs none.
_SENT_END = re.compile(
    r"(?P<punct>[.!?…]+)[\"'”’»)\]}*_]*[^\S\n]+(?=\S)|[。！？]+[」』）”’\"'»)\]]*[^\S\n]*(?=\S)"
)
_THINK_CLOSE = re.compile(r"</think>[^\S\n]*(?=\S)")
_CLOSE_AHEAD = re.compile(r"[ \t]*</think>")
_OPENERS = re.compile(
    r"^[ \t]*(?P<fence>`{3,}|~{3,})|(?P<code>`+)|(?<!\\)(?P<dmath>\$\$)"
    r"|(?<!\\)(?P<imath>\$)(?=[^\s$])|(?P<bmath>\\\[)|(?P<pmath>\\\()",
    re.MULTILINE,
)
_FENCE_LINE = re.compile(r"^[ \t]*(`{3,}|~{3,})([^\n]*)", re.MULTILINE)
# Inline math follows Pandoc: a closing `$` follows a non-space and precedes no digit, so
# "$5 and $10" stays prose.
_CLOSERS = {
    "dmath": re.compile(r"(?<!\\)\$\$"),
    "bmath": re.compile(r"\\\]"),
    "pmath": re.compile(r"\\\)"),
    "imath": re.compile(r"(?<![\s\\$])\$(?![\d$])"),
    "newline": re.compile(r"\n"),
}
_BACKTICKS = re.compile(r"`+")
_WORD = re.compile(r"[A-Za-z']+")
_INITIALS = re.compile(r"(?:[A-Z]\.)*[A-Z]")
_ENUMERATOR = re.compile(r"\d{1,3}|[A-Za-z]|[ivxlc]{1,5}|[IVXLC]{1,5}")
_LIST_PREFIX = re.compile(r"[ \t>#*+•\-]*")


def _words(words: str) -> frozenset[str]:
    return frozenset(words.split())


# Never end a sentence: the next word belongs to the same sentence.
_ABBREVIATIONS = _words(
    "e.g E.g i.e I.e vs Vs viz cf Cf Fig fig Figs figs Eq eq Eqs eqs Dr Mr Mrs Ms Prof Jr Sr St "
    "approx Approx Sec Secs Ch resp Resp Vol pp Ref Refs Thm Lem Def Prop Cor"
)
# Abbreviations only before a number ("No. 5"); "no." is also the word "no" ending a sentence.
_NUMBER_ABBREVIATIONS = frozenset(["No", "Nos", "no"])
# Often end a sentence too; they do so only when a typical sentence opener follows.
_AMBIGUOUS = frozenset(["etc", "al", "a.m", "p.m", "A.M", "P.M"])
_SENTENCE_STARTERS = _words(
    "The This That These Those Then So Now But And Or Thus Hence Therefore We I It Its Let Let's "
    "Next First Second Third Finally Also However Wait Hmm Okay OK Ok Yes No If In On At For To A "
    "An What How Why Since Because Alternatively Actually Similarly Note Check Here There Step "
    "Answer Maybe Perhaps Oh Right Another After Before Given From Using When Which Where Each "
    "All Both Consider Suppose Recall Again Indeed Still Otherwise Looking They He She You"
)


def segment_steps(text: str, mode: str = "sentence", min_chars: int = 8) -> list[str]:
    """Split ``text`` into steps whose concatenation is exactly ``text``.

    Args:
        text: The response to split.
        mode: ``"sentence"`` cuts after sentence punctuation and at line breaks, never inside code
            or math; ``"line"`` cuts after every newline (runs of blank lines stay with the line
            before); ``"paragraph"`` cuts after runs of blank lines outside code fences and math.
        min_chars: Fragments with fewer non-whitespace characters merge into the following step
            (a short last fragment merges into the previous one). ``0`` disables merging, except
            that whitespace-only fragments always merge.

    Returns:
        The steps, none empty: ``[]`` for an empty text, ``[text]`` for whitespace only.

    Raises:
        ValueError: ``mode`` is not one of ``SEGMENT_MODES`` or ``min_chars`` is negative.
    """
    if mode not in SEGMENT_MODES:
        raise ValueError(f"unknown segment mode {mode!r}; expected one of {SEGMENT_MODES}")
    if min_chars < 0:
        raise ValueError(f"min_chars must be >= 0, got {min_chars}")
    if not text:
        return []
    if mode == "line":
        cuts = [m.end() for m in _LINE_RUN.finditer(text)]
    else:
        spans = _protected_spans(text)
        if mode == "paragraph":
            cuts = [m.end() for m in _PARA_RUN.finditer(text) if not spans.covers(m.end() - 1)]
        else:
            cuts = _sentence_cuts(text, spans)
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)]) if a < b]
    return _merge_short(pieces, max(min_chars, 1))


def check_steps(steps: Iterable[str], text: str) -> str | None:
    """Check that ``steps`` partitions ``text``.

    Args:
        steps: Candidate steps, usually a ``steps`` column value (any non-string iterable).
        text: The response the steps must reproduce.

    Returns:
        ``None`` when ``steps`` is a non-empty sequence of non-empty strings whose concatenation
        equals ``text`` exactly, else a short human-readable reason. Empty-string steps are
        rejected: they own no tokens and would be scored as nothing.
    """
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        return f"steps must be a list of strings, got {type(steps).__name__}"
    if not isinstance(text, str):
        return f"response must be a string, got {type(text).__name__}"
    items = steps.tolist() if hasattr(steps, "tolist") else list(steps)
    if not items:
        return "steps is empty"
    pos = 0
    for i, step in enumerate(items):
        if not isinstance(step, str):
            return f"step {i} is not a string ({type(step).__name__})"
        if not step:
            return f"step {i} is empty"
        if not text.startswith(step, pos):
            return f"step {i} does not match the response at character {pos}"
        pos += len(step)
    if pos != len(text):
        return f"steps cover {pos} of the response's {len(text)} characters"
    return None


class _Spans:
    """Disjoint, sorted ``[start, end)`` character ranges that no cut may enter."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        self.starts.append(start)
        self.ends.append(end)

    def covers(self, pos: int) -> bool:
        i = bisect_right(self.starts, pos) - 1
        return i >= 0 and pos < self.ends[i]


def _protected_spans(text: str) -> _Spans:
    """Find code and math spans, scanning left to right so the earliest opener wins."""
    spans = _Spans()
    # Closers are listed once per kind and bisected, so an unclosed opener costs O(log n).
    closers: dict[str, list[int]] = {}
    end = 0
    for m in _OPENERS.finditer(text):
        kind = m.lastgroup or ""
        start = m.start(kind)
        if start < end:
            continue
        if kind == "fence":
            end = _fence_end(text, closers, m)
            spans.add(start, end)
            continue
        width = len(m.group(kind))
        key = f"code{width}" if kind == "code" else kind
        if key not in closers:
            if kind == "code":
                for run in _BACKTICKS.finditer(text):
                    closers.setdefault(f"code{len(run.group())}", []).append(run.start())
            else:
                closers[key] = [c.start() for c in _CLOSERS[kind].finditer(text)]
        positions = closers[key]
        i = bisect_left(positions, m.end())
        if i == len(positions):
            continue
        close = positions[i]
        # Inline code and inline math never span lines; a stray "$" or "`" must not swallow prose.
        if kind in ("code", "imath") and _next_newline(text, closers, start) < close:
            continue
        end = close + (width if kind in ("code", "imath") else 2)
        spans.add(start, end)
    return spans


def _fence_end(text: str, closers: dict[str, list[int]], m: re.Match[str]) -> int:
    """End of the fenced block opened by ``m``: its closing run, or the text's end if unclosed."""
    if "fence" not in closers:
        closers["fence"] = [f.start() for f in _FENCE_LINE.finditer(text)]
    run = m.group("fence")
    starts = closers["fence"]
    for i in range(bisect_right(starts, m.start()), len(starts)):
        f = _FENCE_LINE.match(text, starts[i])
        if f and f.group(1)[0] == run[0] and len(f.group(1)) >= len(run) and not f.group(2).strip():
            return f.end(1)
    return len(text)


def _next_newline(text: str, closers: dict[str, list[int]], pos: int) -> int:
    if "newline" not in closers:
        closers["newline"] = [c.start() for c in _CLOSERS["newline"].finditer(text)]
    lines = closers["newline"]
    i = bisect_left(lines, pos)
    return lines[i] if i < len(lines) else len(text)


def _sentence_cuts(text: str, spans: _Spans) -> list[int]:
    """Cut positions for sentence mode, sorted and unique."""
    cuts: set[int] = set()
    for m in _LINE_RUN.finditer(text):
        if spans.covers(m.end() - 1) or _CLOSE_AHEAD.match(text, m.end()):
            continue
        if text[max(0, m.start() - 16) : m.start()].rstrip(" \t").endswith("<think>"):
            continue
        cuts.add(m.end())
    for m in _SENT_END.finditer(text):
        if spans.covers(m.start()) or text.startswith("</think>", m.end()):
            continue
        if m.group("punct") is None or _ends_sentence(text, m.start(), m.group("punct"), m.end()):
            cuts.add(m.end())
    for m in _THINK_CLOSE.finditer(text):
        if not spans.covers(m.start()):
            cuts.add(m.end())
    return sorted(cuts)


def _ends_sentence(text: str, pos: int, punct: str, after: int) -> bool:
    """Whether ``punct`` at ``pos``, then whitespace and a word at ``after``, ends a sentence."""
    if text[after].islower():
        # "hmm... maybe", "approx. three", '"why?" she asked': a lowercase word continues.
        return False
    if punct != ".":
        return True
    window = text[max(0, pos - 32) : pos]
    raw = window.rsplit(None, 1)[-1] if window and not window[-1].isspace() else ""
    token = raw.lstrip("([{\"'“‘*_<")
    if _ENUMERATOR.fullmatch(token):
        # "1. First ..." at the start of a line is a list marker, not a sentence.
        head = text[max(0, pos - len(raw) - 16) : pos - len(raw)]
        at_line_start = "\n" in head or pos - len(raw) <= 16
        if at_line_start and _LIST_PREFIX.fullmatch(head.rsplit("\n", 1)[-1]):
            return False
    if token in _ABBREVIATIONS:
        return False
    if token in _NUMBER_ABBREVIATIONS:
        return not text[after].isdigit()
    if token in _AMBIGUOUS or _INITIALS.fullmatch(token):
        word = _WORD.match(text, after)
        return word is not None and word.group() in _SENTENCE_STARTERS
    return True


def _merge_short(pieces: list[str], min_chars: int) -> list[str]:
    """Merge pieces with fewer than ``min_chars`` non-whitespace characters forward (last: back)."""
    steps: list[str] = []
    buf: list[str] = []
    count = 0
    for piece in pieces:
        buf.append(piece)
        count += len("".join(piece.split()))
        if count >= min_chars:
            steps.append("".join(buf))
            buf, count = [], 0
    if buf:
        if steps:
            steps[-1] += "".join(buf)
        else:
            steps.append("".join(buf))
    return steps
