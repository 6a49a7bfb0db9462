"""Step segmentation (ln_ray/prepare/segment.py): exact splits on nasty real-world text, partition
invariants, speed."""

from __future__ import annotations

import random
import sys
import time

import pytest

from ln_ray.prepare.segment import SEGMENT_MODES, check_steps, segment_steps


def sentences(text: str) -> list[str]:
    """Sentence mode without merging, so every cut decision is visible."""
    return segment_steps(text, "sentence", min_chars=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Pi is 3.14 here. Then e is 2.718.", ["Pi is 3.14 here. ", "Then e is 2.718."]),
        ("Use 1.5e-3 and v2.0.1 now. Done.", ["Use 1.5e-3 and v2.0.1 now. ", "Done."]),
        ("Ping 192.168.0.1 or 10.000 hosts. Ok.", ["Ping 192.168.0.1 or 10.000 hosts. ", "Ok."]),
        ("The total is 42. Next we check.", ["The total is 42. ", "Next we check."]),
        ("Let the root be x. Then x is 2.", ["Let the root be x. ", "Then x is 2."]),
    ],
)
def test_numbers_and_sentence_final_tokens(text, expected):
    assert sentences(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Use a prime, e.g. The number 7, here.",
        "That is, i.e. Every case holds.",
        "Lists, sets, etc. are iterable.",
        "Cats vs. Dogs is a classic.",
        "See Fig. 3 and fig. 4 for it.",
        "By Eq. 2 and eq. 5 we get it.",
        "Dr. Jones met Mr. Li and Mrs. Wu and Ms. Ode.",
        "Prof. Knuth lives on Main St. Stanford is near.",
        "It costs approx. 5 dollars.",
        "Compare cf. Theorem 2 first.",
        "As Smith et al. (2020) show.",
        "Read Sec. 4 and Ch. 2 first.",
        "A and B, resp. X and Y, hold.",
        "At 5 a.m. Sharp, he woke.",
        "The U.S. Army marched.",
        "Written by J. Smith and J.R.R. Tolkien.",
        "Item No. 5 is here.",
        "Hmm... maybe not.",
        "Okay… so it works.",
    ],
)
def test_abbreviations_initials_and_lowercase_continuations_do_not_split(text):
    assert sentences(text) == [text]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("We sell apples, etc. Then we rest.", ["We sell apples, etc. ", "Then we rest."]),
        ("It was Smith et al. We extend it.", ["It was Smith et al. ", "We extend it."]),
        ("I live in the U.S. Then I moved.", ["I live in the U.S. ", "Then I moved."]),
        ("So the answer is B. Let me check.", ["So the answer is B. ", "Let me check."]),
        ("Is it even? No. It is odd.", ["Is it even? ", "No. ", "It is odd."]),
        ("It takes 5 ms. Then it ends.", ["It takes 5 ms. ", "Then it ends."]),
        ("Wait... Let me redo it.", ["Wait... ", "Let me redo it."]),
        ("Really?! Yes! Good.", ["Really?! ", "Yes! ", "Good."]),
    ],
)
def test_sentence_final_abbreviations_and_ellipses_split_before_a_new_sentence(text, expected):
    assert sentences(text) == expected


def test_closing_quotes_and_brackets_stay_with_the_sentence():
    text = "He said \"stop.\" Then he left. (It was late.) He said 'no!' **Done.** Ok."
    assert sentences(text) == [
        'He said "stop." ',
        "Then he left. ",
        "(It was late.) ",
        "He said 'no!' ",
        "**Done.** ",
        "Ok.",
    ]


def test_nested_quotes():
    text = (
        "She wrote: \u201cHe said \u2018go.\u2019\u201d Then silence. \u201cWhy?\u201d she asked."
    )
    assert sentences(text) == [
        "She wrote: \u201cHe said \u2018go.\u2019\u201d ",
        "Then silence. ",
        "\u201cWhy?\u201d she asked.",
    ]


def test_inline_math_is_never_split():
    text = r"We have $x = 1. Y = 2$ here. And \(a. B\) too. Costs $5. Then $6. Done."
    assert sentences(text) == [
        "We have $x = 1. Y = 2$ here. ",
        r"And \(a. B\) too. ",
        "Costs $5. ",
        "Then $6. ",
        "Done.",
    ]


def test_display_math_bracket_block_on_its_own_lines_is_one_step():
    text = "We compute:\n\\[\nx = 1. \n\n Y = 2.\n\\]\nSo x is 1. Done."
    assert sentences(text) == [
        "We compute:\n",
        "\\[\nx = 1. \n\n Y = 2.\n\\]\n",
        "So x is 1. ",
        "Done.",
    ]


def test_display_math_dollars_block_and_inline_display():
    text = "Sum:\n$$\na = 1.\n\nB = 2.\n$$\nAnd $$c. D$$ inline. End."
    assert sentences(text) == [
        "Sum:\n",
        "$$\na = 1.\n\nB = 2.\n$$\n",
        "And $$c. D$$ inline. ",
        "End.",
    ]


def test_unclosed_math_protects_nothing():
    assert sentences("Pay $5 now. Then $$ more. Ok.") == ["Pay $5 now. ", "Then $$ more. ", "Ok."]


def test_code_fence_with_periods_and_blank_lines_is_one_step():
    text = "Code:\n```python\nx = 1. Y\n\nprint(x.y)  # Done. Next.\n```\nIt ran. Good.\n"
    assert sentences(text) == [
        "Code:\n",
        "```python\nx = 1. Y\n\nprint(x.y)  # Done. Next.\n```\n",
        "It ran. ",
        "Good.\n",
    ]


def test_tilde_fence_and_indented_fence():
    text = "A:\n  ~~~\n  a. B\n\n  ~~~\nB. End.\n"
    assert sentences(text) == ["A:\n", "  ~~~\n  a. B\n\n  ~~~\n", "B. End.\n"]


def test_unclosed_fence_runs_to_the_end():
    text = "Start.\n```\nA. B\n\nC. D"
    assert sentences(text) == ["Start.\n", "```\nA. B\n\nC. D"]


def test_inline_code_is_never_split():
    text = "Call `foo. Bar()` now. Then ``a`b. C`` too. Stray ` tick. Ok."
    assert sentences(text) == [
        "Call `foo. Bar()` now. ",
        "Then ``a`b. C`` too. ",
        "Stray ` tick. ",
        "Ok.",
    ]


def test_list_markers_stay_with_their_text():
    text = (
        "Plan:\n1. First do X. Then Y.\n2) Second.\na) Sub. Item.\nA. Option\n  iv. Roman\n"
        "- dash. Two.\n* star\n\u2022 dot\n**3.** Bold.\n"
    )
    assert sentences(text) == [
        "Plan:\n",
        "1. First do X. ",
        "Then Y.\n",
        "2) Second.\n",
        "a) Sub. ",
        "Item.\n",
        "A. Option\n",
        "  iv. Roman\n",
        "- dash. ",
        "Two.\n",
        "* star\n",
        "\u2022 dot\n",
        "**3.** Bold.\n",
    ]


def test_headings_are_their_own_line_and_merge_when_short():
    text = "## Step 2\nCompute the sum now.\n### A much longer heading\nBody text."
    assert sentences(text) == [
        "## Step 2\n",
        "Compute the sum now.\n",
        "### A much longer heading\n",
        "Body text.",
    ]
    assert segment_steps(text) == [
        "## Step 2\nCompute the sum now.\n",
        "### A much longer heading\n",
        "Body text.",
    ]


def test_line_breaks_end_steps_and_blank_lines_stay_behind():
    text = "no period here\nnext line   \n\n  \n  indented. Two.\n"
    assert sentences(text) == [
        "no period here\n",
        "next line   \n\n  \n",
        "  indented. ",
        "Two.\n",
    ]


def test_think_tags():
    text = "<think>\nFirst thought. Second one.\n</think>\n\nThe answer is 4."
    assert sentences(text) == [
        "<think>\nFirst thought. ",
        "Second one.\n</think>\n\n",
        "The answer is 4.",
    ]
    assert sentences("<think>Hmm. Ok.</think>Answer: 4.") == [
        "<think>Hmm. ",
        "Ok.</think>",
        "Answer: 4.",
    ]
    assert sentences("<think>\n\n</think>\n\nHi there.") == ["<think>\n\n</think>\n\n", "Hi there."]


def test_cjk_punctuation_splits_without_spaces():
    text = "这是第一句。这是第二句！真的吗？\u201c是的。\u201d好。 End."
    assert sentences(text) == [
        "这是第一句。",
        "这是第二句！",
        "真的吗？",
        "\u201c是的。\u201d",
        "好。 ",
        "End.",
    ]


def test_windows_line_endings():
    text = "Line one.\r\nLine two. More.\r\n\r\nPara two.\r\n"
    assert sentences(text) == ["Line one.\r\n", "Line two. ", "More.\r\n\r\n", "Para two.\r\n"]
    assert segment_steps(text, "line", 0) == [
        "Line one.\r\n",
        "Line two. More.\r\n\r\n",
        "Para two.\r\n",
    ]
    assert segment_steps(text, "paragraph", 0) == [
        "Line one.\r\nLine two. More.\r\n\r\n",
        "Para two.\r\n",
    ]


def test_leading_and_trailing_whitespace():
    assert sentences("  \n\n  Hello there. World.  \n\n") == [
        "  \n\n  Hello there. ",
        "World.  \n\n",
    ]
    assert sentences("End.   ") == ["End.   "]


def test_short_fragments_merge_forward():
    text = "Ok. So. Now we are talking. Yes, indeed."
    assert segment_steps(text, min_chars=8) == ["Ok. So. Now we are talking. ", "Yes, indeed."]
    assert segment_steps(text, min_chars=4) == ["Ok. So. ", "Now we are talking. ", "Yes, indeed."]
    assert segment_steps(text, min_chars=0) == [
        "Ok. ",
        "So. ",
        "Now we are talking. ",
        "Yes, indeed.",
    ]


def test_short_last_fragment_merges_backward():
    assert segment_steps("A long enough sentence. Ok.") == ["A long enough sentence. Ok."]
    assert segment_steps("Hi. Ok.") == ["Hi. Ok."]


def test_min_chars_counts_non_whitespace():
    assert segment_steps("abcd   \n\n\n   efgh ijkl.", "line", min_chars=5) == [
        "abcd   \n\n\n   efgh ijkl."
    ]
    assert segment_steps("abcde   \n\n\nefgh ijkl.", "line", min_chars=5) == [
        "abcde   \n\n\n",
        "efgh ijkl.",
    ]


def test_line_mode():
    text = "\nOne. Two.\n\n\nThree\n  four\n```\ncode\n```"
    assert segment_steps(text, "line", 0) == [
        "\nOne. Two.\n\n\n",
        "Three\n",
        "  four\n",
        "```\n",
        "code\n",
        "```",
    ]


def test_paragraph_mode():
    text = "Para one. Still one.\nSame para.\n \n\t\nPara two.\n\n```\na\n\nb\n```\n\nLast.\n"
    assert segment_steps(text, "paragraph", 0) == [
        "Para one. Still one.\nSame para.\n \n\t\n",
        "Para two.\n\n",
        "```\na\n\nb\n```\n\n",
        "Last.\n",
    ]


@pytest.mark.parametrize("mode", SEGMENT_MODES)
def test_empty_and_whitespace_only(mode):
    assert segment_steps("", mode) == []
    for blank in (" ", "\n", "\n\n\n", " \n \n ", "\r\n\r\n", "\t"):
        assert segment_steps(blank, mode, 0) == [blank]
        assert segment_steps(blank, mode, 8) == [blank]


def test_unknown_mode_and_negative_min_chars_raise():
    with pytest.raises(ValueError, match="sentence.*line.*paragraph"):
        segment_steps("Hello.", "word")
    with pytest.raises(ValueError, match="min_chars"):
        segment_steps("Hello.", min_chars=-1)


def test_check_steps_accepts_a_partition():
    text = "One. Two.\n"
    assert check_steps(["One. ", "Two.\n"], text) is None
    assert check_steps(("One. Two.\n",), text) is None
    assert check_steps(segment_steps(text, min_chars=0), text) is None


@pytest.mark.parametrize(
    ("steps", "reason"),
    [
        ([], "empty"),
        ("One. Two.\n", "list"),
        (None, "list"),
        (["One. ", 2], "not a string"),
        (["One. ", "", "Two.\n"], "step 1 is empty"),
        (["One.", "Two.\n"], "does not match"),
        (["One. ", "Two."], "cover"),
        (["One. ", "Two.\n", "x"], "does not match"),
        (["Two.\n", "One. "], "does not match"),
    ],
)
def test_check_steps_rejects(steps, reason):
    problem = check_steps(steps, "One. Two.\n")
    assert problem is not None and reason in problem


def test_check_steps_rejects_non_string_response():
    assert "response" in check_steps(["a"], None)


_ATOMS = [
    ".",
    ". ",
    "! ",
    "? ",
    "...",
    "\u2026",
    "\u3002",
    "\uff01",
    "\uff1f",
    " ",
    "  ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    "\r",
    " \n ",
    "\u3000",
    "\xa0",
    "$",
    "$$",
    "\\[",
    "\\]",
    "\\(",
    "\\)",
    "`",
    "```",
    "~~~",
    "```py\n",
    "\n```\n",
    "<think>",
    "</think>",
    "<think>\n",
    "\n</think>\n",
    "e.g.",
    "et al.",
    "J.",
    "U.S.",
    "1.",
    "2)",
    "- ",
    "* ",
    "## ",
    '"',
    "\u201d",
    ")",
    "**",
    "a",
    "B",
    "word",
    "Then",
    "3.14",
    "x",
    "\u9762",
    "#",
    "\\",
    "\ud7ff",
    "\U0001f600",
]


def _adversarial(rng: random.Random) -> str:
    return "".join(rng.choice(_ATOMS) for _ in range(rng.randint(0, 60)))


@pytest.mark.parametrize("mode", SEGMENT_MODES)
@pytest.mark.parametrize("min_chars", [0, 1, 8, 40])
def test_partition_invariants_on_adversarial_strings(mode, min_chars):
    rng = random.Random(f"{mode}-{min_chars}")
    for _ in range(1500):
        text = _adversarial(rng)
        steps = segment_steps(text, mode, min_chars)
        assert "".join(steps) == text
        if not text:
            assert steps == []
            continue
        assert check_steps(steps, text) is None
        if not text.strip():
            assert steps == [text]
        elif len(steps) > 1:
            # Every step carries enough content; whitespace never forms a step of its own.
            assert all(len("".join(s.split())) >= max(min_chars, 1) for s in steps)
        if mode != "sentence":
            assert all(s.endswith("\n") for s in steps[:-1])


@pytest.mark.parametrize("mode", SEGMENT_MODES)
def test_partition_invariant_on_random_unicode(mode):
    rng = random.Random(mode)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + list("\n\r\t\u3002\u2026\u201d\u00e9\u4e00")
    for _ in range(500):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 300)))
        assert "".join(segment_steps(text, mode, 0)) == text
        assert "".join(segment_steps(text, mode)) == text


def test_cuts_only_follow_whitespace_cjk_or_think_close():
    rng = random.Random(7)
    for _ in range(1500):
        text = _adversarial(rng)
        pos = 0
        for step in sentences(text)[:-1]:
            pos += len(step)
            before = text[:pos]
            assert (
                before[-1].isspace()
                or before.endswith("</think>")
                or before.rstrip("\u300d\u300f\uff09\u201d\u2019\"'\u00bb)]")[-1]
                in "\u3002\uff01\uff1f"
            ), (text, pos)


def _calls(text: str, mode: str) -> int:
    """Python and C function calls made segmenting ``text``: a count of work, not a time."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        steps = segment_steps(text, mode)
    finally:
        sys.setprofile(None)
    assert "".join(steps) == text
    return calls


@pytest.mark.parametrize(
    "unit",
    [
        "Okay, so 3.14 is pi, e.g. roughly. Let $x = 1$ and \\(y = 2\\). Wait... Then J. Smith "
        "said `f(x).y` is ok!\n1. Step one.\n\n```py\nx = 1. y\n```\n\\[\na. B\n\\]\n",
        "$a `b \\( \\[ $$ ```\n",
        "J. ",
    ],
    ids=["realistic", "unclosed-openers", "initials"],
)
def test_segmenting_costs_grow_linearly_with_the_text(unit):
    """Four times the text, about four times the work, however the text opens and never closes
    math, code or quotes: the calls made (which a scan in Python shows) and the time taken
    (which a scan inside one C call shows; best of three, a ratio within one run, where a
    quadratic scan would take 16 times as long)."""
    small = unit * (20_000 // len(unit) + 1)
    for mode in SEGMENT_MODES:
        calls = _calls(small * 4, mode) / _calls(small, mode)
        assert calls < 4.6, f"{mode}: 4x the text makes {calls:.1f}x the calls"
        seconds = _seconds(small * 4, mode) / _seconds(small, mode)
        assert seconds < 8, f"{mode}: 4x the text takes {seconds:.1f}x as long"


def _seconds(text: str, mode: str) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        segment_steps(text, mode)
        best = min(best, time.perf_counter() - started)
    return best


COT = r"""<think>
Okay, so I need to find the area of the triangle with vertices at (0, 0), (4, 0) and (0, 3).
Hmm... maybe I should recall the formula first. The area is $A = \frac{1}{2} b h$, i.e. half
the base times the height.

Let me set it up:
1. The base is 4 (from x = 0 to x = 4).
2. The height is 3.
- Sanity check: both legs lie on the axes, e.g. the right angle is at the origin.
a) Note that 3.14 and v2.0.1 are irrelevant here.

So the area is
\[
A = \frac{1}{2} \cdot 4 \cdot 3 = 6.
\]
Wait... Let me double-check with the shoelace formula (cf. Eq. 2 in Smith et al. 2019).

$$
A = \frac{1}{2} |x_1 y_2 - x_2 y_1| = \frac{1}{2} |4 \cdot 3 - 0| = 6.
$$

In code, just to be sure:
```python
def area(b: float, h: float) -> float:
    # Half of 4.0 * 3.0. Obviously.

    return 0.5 * b * h
```
Running `area(4.0, 3.0)` gives 6.0. The ratio is approx. 1.33 for the legs, vs. 5.0 for the
hypotenuse.
Dr. Smith (J. Smith, actually) said "the answer is six." Then I checked again!
Is it 6? Yes. 面积是六。对吗？对。
## Final check
Everything agrees at 6.0 units, so we're done.
* One more look: the legs are 3 and 4. The hypotenuse is 5.
  That is the classic 3-4-5 triangle, resp. its scaled copies.
Good.
</think>

The area of the triangle is **6**.
"""


def test_realistic_chain_of_thought():
    assert 38 <= COT.count("\n") <= 42
    steps = segment_steps(COT)
    assert "".join(steps) == COT
    assert len(steps) == 29
    assert steps[0].startswith("<think>\nOkay, so I need")
    assert steps[1] == "Hmm... maybe I should recall the formula first. "
    assert steps[2] == "The area is $A = \\frac{1}{2} b h$, i.e. half\n"
    assert steps[5] == "1. The base is 4 (from x = 0 to x = 4).\n"
    assert steps[8] == "a) Note that 3.14 and v2.0.1 are irrelevant here.\n\n"
    assert steps[10] == "\\[\nA = \\frac{1}{2} \\cdot 4 \\cdot 3 = 6.\n\\]\n"
    assert steps[11].startswith("Wait... Let me double-check")
    assert steps[12].startswith("$$\n") and steps[12].endswith("\n$$\n\n")
    assert steps[14].startswith("```python\n") and steps[14].endswith("\n```\n")
    assert steps[16] == "The ratio is approx. 1.33 for the legs, vs. 5.0 for the\n"
    assert steps[18] == 'Dr. Smith (J. Smith, actually) said "the answer is six." '
    assert steps[17] == "hypotenuse.\n"  # A line break ends a step, even mid-sentence.
    assert steps[26] == "  That is the classic 3-4-5 triangle, resp. its scaled copies.\n"
    assert steps[-2] == "Good.\n</think>\n\n"
    assert steps[-1] == "The area of the triangle is **6**.\n"
    unmerged = segment_steps(COT, min_chars=0)
    assert "Wait... " in unmerged and "## Final check\n" in unmerged
    assert unmerged[-10:-7] == ["面积是六。", "对吗？", "对。\n"]
