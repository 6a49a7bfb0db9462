"""Write the embedded demo dataset, ``ln_ray/demo/traces.jsonl``, deterministically.

A build-time script: only the data ships in the package. Run ``python scripts/demo_data.py`` to
rewrite it (``--check`` only verifies it is up to date; the tests run that).
The sample is built from hand-written problem templates (shopping totals, average speeds, ages,
fractions, percentages, unit conversions, a river crossing, race ordering, heads and legs, test
averages) whose numbers are drawn with a fixed seed, so every prompt is different and every run
writes the same bytes. Each kind is one entry of the ``KINDS`` table: a function that draws its
numbers (the only code a kind has) and templates, over those numbers, for the prompt and for the
three hand-written styles; the conclusions are shared. Standard library only.

Each prompt gets one trace from each of four teachers, one step (one sentence) per line:

* ``teacher-clear``: restates what is known, computes intermediate quantities in order and ends
  with "So the answer is N." Always correct.
* ``teacher-verbose``: the same reasoning in a chattier, explanatory voice. A few prompts carry an
  arithmetic slip in one step that is carried through to a wrong final answer (``correct: false``).
* ``teacher-terse``: telegraphic and symbolic (``cost = 3 * 4 = 12`` ... ``answer: 12``). Correct.
* ``teacher-scrambled``: exactly the steps of ``teacher-clear`` in a shuffled order: the
  conclusion comes in the first half and no two original neighbours stay neighbours, so results
  are used before they are computed. Every step is still true and the answer is right, so
  ``correct`` is true: only a step-local naturalness metric should notice the unnatural order.

Rows have the keys ``prompt_id``, ``prompt``, ``teacher``, ``response`` and ``correct`` and are
sorted by prompt id, then teacher.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 20250611
PROMPTS_PER_KIND = 3
DATA_PATH = Path(__file__).resolve().parent.parent / "ln_ray" / "demo" / "traces.jsonl"
TEACHERS = ("teacher-clear", "teacher-scrambled", "teacher-terse", "teacher-verbose")
_NUMBER = re.compile(r"\d+")

_PEOPLE = (
    ("Mia", "she", "her"),
    ("Liam", "he", "his"),
    ("Sofia", "she", "her"),
    ("Noah", "he", "his"),
    ("Ava", "she", "her"),
    ("Ethan", "he", "his"),
    ("Zara", "she", "her"),
    ("Omar", "he", "his"),
    ("Chloe", "she", "her"),
    ("Lucas", "he", "his"),
    ("Priya", "she", "her"),
    ("Mateo", "he", "his"),
)
_RUNNERS = ("Ana", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade")
_GOODS = (  # plural, variable name, price range in dollars
    ("notebooks", "notebooks", 2, 6),
    ("pens", "pens", 1, 4),
    ("comic books", "comics", 3, 8),
    ("packs of stickers", "stickers", 2, 5),
    ("water bottles", "bottles", 4, 9),
)
_EXTRAS = (("backpack", 15, 35), ("lunch box", 8, 16), ("calculator", 10, 25), ("scarf", 9, 20))
_VEHICLES = ("train", "bus", "car", "truck")
_BAKED = ("muffins", "cookies", "bagels", "cupcakes")
_FRACTIONS = ((1, 2), (1, 3), (1, 4), (2, 3), (3, 4), (1, 5), (2, 5), (1, 6))
_PRICED = ("jacket", "pair of shoes", "lamp", "board game", "backpack")
_LENGTHY = ("ribbon", "rope", "strip of paper", "piece of wire")
_ORDINALS = ("first", "second", "third", "fourth")


def _person(rng: random.Random, variant: int) -> tuple[str, str, str]:
    # Each variant draws from its own third of the list, so one kind never repeats a name.
    block = len(_PEOPLE) // PROMPTS_PER_KIND
    return _PEOPLE[variant * block + rng.randrange(block)]


def _an(number: int) -> str:
    return "an" if str(number).startswith(("8", "11", "18")) else "a"


def _part(whole: int, num: int, den: int) -> str:
    return f"{whole} / {den}" if num == 1 else f"{whole} / {den} * {num}"


def _slip(rng: random.Random, size: int) -> int:
    return rng.choice((-size, size))


@dataclass(frozen=True)
class Kind:
    """One problem kind: how its numbers are drawn, and its texts as templates over them.

    Attributes:
        draw: ``draw(rng, variant, slip)`` returns the values the templates name. ``answer`` is
            the correct answer; a kind that can carry a slip also returns ``v_answer``, the
            verbose teacher's answer after the slip (equal to ``answer`` without one).
        prompt: The question, one or two sentences ending with a question mark.
        clear: ``teacher-clear`` steps in their natural order, before the conclusion.
        verbose: ``teacher-verbose`` steps before the conclusion (they may carry the slip).
        terse: ``teacher-terse`` steps before the final ``answer:`` line.
        slips: Whether a verbose slip changes this kind's answer (only these kinds get one).
    """

    draw: Callable[[random.Random, int, bool], dict[str, Any]]
    prompt: str
    clear: tuple[str, ...]
    verbose: tuple[str, ...]
    terse: tuple[str, ...]
    slips: bool = False


@dataclass(frozen=True)
class Problem:
    """One prompt with its steps in the three hand-written styles."""

    prompt: str
    clear: list[str]
    verbose: list[str]
    terse: list[str]
    verbose_correct: bool


def make_problem(kind: Kind, rng: random.Random, variant: int, slip: bool) -> Problem:
    """Draw ``kind``'s numbers and fill in its templates; each style ends with its conclusion."""
    values = kind.draw(rng, variant, slip)
    values.setdefault("v_answer", values["answer"])

    def fill(templates: tuple[str, ...]) -> list[str]:
        return [template.format(**values) for template in templates]

    return Problem(
        prompt=kind.prompt.format(**values),
        clear=fill(kind.clear) + [f"So the answer is {values['answer']}."],
        verbose=fill(kind.verbose) + [f"So the answer is {values['v_answer']}."],
        terse=fill(kind.terse) + [f"answer: {values['answer']}"],
        verbose_correct=values["v_answer"] == values["answer"],
    )


def _draw_shopping(rng: random.Random, variant: int, slip: bool) -> dict[str, Any]:
    name, she, _ = _person(rng, variant)
    goods, var, low, high = _GOODS[variant]
    extra, extra_low, extra_high = _EXTRAS[variant]
    n, price, fee = rng.randint(3, 8), rng.randint(low, high), rng.randint(extra_low, extra_high)
    bill = next(b for b in (20, 50, 100) if b > n * price + fee + 2)
    cost = n * price
    total = cost + fee
    v_cost = cost + (_slip(rng, 2) if slip else 0)
    v_total = v_cost + fee
    return dict(
        name=name, she=she, goods=goods, var=var, extra=extra, n=n, price=price, fee=fee,
        bill=bill, cost=cost, total=total, answer=bill - total, v_cost=v_cost, v_total=v_total,
        v_answer=bill - v_total,
    )  # fmt: skip


SHOPPING = Kind(
    _draw_shopping,
    prompt="{name} buys {n} {goods} at ${price} each and a {extra} for ${fee}. "
    "If {she} pays with a ${bill} bill, how much change does {she} get?",
    clear=(
        "{name} buys {n} {goods} at ${price} each and a {extra} for ${fee}, paying with ${bill}.",
        "We need to find how much change {she} gets back.",
        "The {goods} cost {n} * ${price} = ${cost}.",
        "The ${cost} for the {goods} plus ${fee} for the {extra} makes a total of "
        "${cost} + ${fee} = ${total}.",
        "Out of ${bill}, a total of ${total} leaves ${bill} - ${total} = ${answer} in change.",
    ),
    verbose=(
        "Let's start with what we know: {name} buys {n} {goods} at ${price} each, plus a "
        "{extra} for ${fee}, and pays with a ${bill} bill.",
        "First, let's figure out how much the {goods} cost together, which is "
        "{n} * ${price} = ${v_cost}.",
        "Now that we know the {goods} cost ${v_cost}, we can add the ${fee} {extra} to get a "
        "total of ${v_cost} + ${fee} = ${v_total}.",
        "Finally, to find the change, we take the ${v_total} total away from the ${bill} {she} "
        "handed over, which gives ${bill} - ${v_total} = ${v_answer}.",
    ),
    terse=(
        "{var} = {n} * {price} = {cost}",
        "total = {cost} + {fee} = {total}",
        "change = {bill} - {total} = {answer}",
    ),
    slips=True,
)


def _draw_speed(rng: random.Random, variant: int, slip: bool) -> dict[str, Any]:
    del slip  # No slip: a wrong leg would rarely leave the average a whole number.
    while True:
        v1, v2 = rng.randrange(30, 100, 10), rng.randrange(30, 100, 10)
        t1, t2 = rng.randint(2, 5), rng.randint(2, 5)
        if v1 != v2 and (v1 * t1 + v2 * t2) % (t1 + t2) == 0:
            break
    d1, d2 = v1 * t1, v2 * t2
    dist, time = d1 + d2, t1 + t2
    return dict(
        vehicle=_VEHICLES[variant], v1=v1, v2=v2, t1=t1, t2=t2, d1=d1, d2=d2, dist=dist,
        time=time, answer=dist // time,
    )  # fmt: skip


SPEED = Kind(
    _draw_speed,
    prompt="A {vehicle} travels at {v1} km/h for {t1} hours and then at {v2} km/h for {t2} "
    "hours. What is its average speed for the whole trip, in km/h?",
    clear=(
        "The {vehicle} goes {v1} km/h for {t1} hours, then {v2} km/h for {t2} hours.",
        "We need the average speed, which is the total distance divided by the total time.",
        "The first part covers {v1} * {t1} = {d1} km.",
        "The second part covers {v2} * {t2} = {d2} km.",
        "Together, the {d1} km and the {d2} km make {d1} + {d2} = {dist} km.",
        "Those {dist} km take {t1} + {t2} = {time} hours in total.",
        "Dividing {dist} km by {time} hours gives an average speed of {answer} km/h.",
    ),
    verbose=(
        "Let's think about what the question gives us: the {vehicle} drives at {v1} km/h for "
        "{t1} hours, and then at {v2} km/h for {t2} hours.",
        "First, let's figure out how far it goes in the first part, which is "
        "{v1} * {t1} = {d1} km.",
        "Next, the second part works the same way, so it covers {v2} * {t2} = {d2} km.",
        "Now that we know both distances, we can add them up to get {d1} + {d2} = {dist} km "
        "in total.",
        "We also need the total time, which is {t1} + {t2} = {time} hours.",
        "Average speed is total distance divided by total time, so it's {dist} / {time} = "
        "{answer} km/h, which is not simply the average of the two speeds.",
    ),
    terse=(
        "d1 = {v1} * {t1} = {d1}",
        "d2 = {v2} * {t2} = {d2}",
        "d = {d1} + {d2} = {dist}",
        "t = {t1} + {t2} = {time}",
        "v = {dist} / {time} = {answer}",
    ),
)


def _draw_ages(rng: random.Random, variant: int, slip: bool) -> dict[str, Any]:
    name, _, her = _person(rng, variant)
    cousin = rng.choice([p[0] for p in _PEOPLE if p[0] != name])
    k, young = 2 + variant, rng.randint(4, 11)
    later = young + rng.randint(3, 12)
    age = k * young
    wait = later - young
    v_age = age + (_slip(rng, 2) if slip else 0)
    return dict(
        name=name, var=name.lower(), her=her, cousin=cousin, k=k, young=young, later=later,
        age=age, wait=wait, answer=age + wait, v_age=v_age, v_answer=v_age + wait,
    )  # fmt: skip


AGES = Kind(
    _draw_ages,
    prompt="{name} is {k} times as old as {her} cousin {cousin}, who is {young} years old. "
    "How old will {name} be when {cousin} turns {later}?",
    clear=(
        "{cousin} is {young} years old, and {name} is {k} times as old.",
        "We need {name}'s age at the time when {cousin} turns {later}.",
        "That makes {name} {k} * {young} = {age} years old now.",
        "{cousin} turns {later} in {later} - {young} = {wait} years.",
        "Adding those {wait} years to {name}'s {age} gives {age} + {wait} = {answer}.",
    ),
    verbose=(
        "Okay, let's see what we know: {cousin} is {young} years old, and {name} is {k} times "
        "as old as {cousin}.",
        "First, let's figure out how old {name} is right now, which is {k} * {young} = {v_age} "
        "years.",
        "Next, we need to know how long it takes for {cousin} to reach {later}, and that's "
        "{later} - {young} = {wait} years from now.",
        "Now that we know {wait} years will pass, we can add them to {name}'s current age: "
        "{v_age} + {wait} = {v_answer}.",
    ),
    terse=(
        "{var} = {k} * {young} = {age}",
        "wait = {later} - {young} = {wait}",
        "{var}_later = {age} + {wait} = {answer}",
    ),
    slips=True,
)


def _draw_fractions(rng: random.Random, variant: int, slip: bool) -> dict[str, Any]:
    del slip  # No slip: a wrong count would usually break the second fraction.
    name, she, _ = _person(rng, variant)
    while True:
        (a, b), (c, d) = rng.choice(_FRACTIONS), rng.choice(_FRACTIONS)
        n = rng.randrange(24, 121, 6)
        if n * a % b == 0 and (n - n * a // b) * c % d == 0 and (a, b) != (c, d):
            break
    morning = n * a // b
    rest = n - morning
    afternoon = rest * c // d
    return dict(
        name=name, she=she, baked=_BAKED[variant], a=a, b=b, c=c, d=d, n=n, morning=morning,
        rest=rest, afternoon=afternoon, answer=rest - afternoon,
        morning_part=_part(n, a, b), afternoon_part=_part(rest, c, d),
    )  # fmt: skip


FRACTIONS = Kind(
    _draw_fractions,
    prompt="{name} bakes {n} {baked}, sells {a}/{b} of them in the morning and {c}/{d} of the "
    "remaining ones in the afternoon. How many {baked} are left?",
    clear=(
        "{name} starts with {n} {baked} and sells them in two rounds.",
        "We need the number of {baked} left at the end of the day.",
        "In the morning {she} sells {a}/{b} of {n}, which is {morning_part} = {morning}.",
        "Selling those {morning} leaves {n} - {morning} = {rest} {baked}.",
        "In the afternoon {she} sells {c}/{d} of the {rest}, which is {afternoon_part} = "
        "{afternoon}.",
        "Selling those {afternoon} leaves {rest} - {afternoon} = {answer} {baked}.",
    ),
    verbose=(
        "Let's break this down: {name} begins the day with {n} {baked} and sells them in two "
        "rounds.",
        "First, let's figure out the morning sales, where {a}/{b} of {n} means we divide {n} "
        "into {b} equal parts and take {a}, which gives {morning_part} = {morning}.",
        "Now that we know {morning} were sold in the morning, we can find how many remain: "
        "{n} - {morning} = {rest}.",
        "Here's the tricky part: the afternoon fraction is of the remaining {rest}, not of the "
        "original {n}, so {c}/{d} of {rest} is {afternoon_part} = {afternoon}.",
        "Finally, we subtract the afternoon sales from what was left, and {rest} - {afternoon} "
        "= {answer} {baked} are still on the shelf.",
    ),
    terse=(
        "morning = {n} * {a}/{b} = {morning}",
        "rest = {n} - {morning} = {rest}",
        "afternoon = {rest} * {c}/{d} = {afternoon}",
        "left = {rest} - {afternoon} = {answer}",
    ),
)


def _draw_percentages(rng: random.Random, variant: int, slip: bool) -> dict[str, Any]:
    while True:
        price = rng.randrange(40, 201, 10)
        off, tax_rate = rng.choice((10, 20, 25, 30, 40, 50)), rng.choice((5, 8, 10))
        sale = price - price * off // 100
        if price * off % 100 == 0 and sale * tax_rate % 100 == 0:
            break
    tax = sale * tax_rate // 100
    v_tax = tax + (_slip(rng, 1) if slip else 0)
    return dict(
        item=_PRICED[variant], price=price, off=off, tax_rate=tax_rate, an=_an(tax_rate),
        discount=price * off // 100, sale=sale, tax=tax, answer=sale + tax, v_tax=v_tax,
        v_answer=sale + v_tax,
    )  # fmt: skip


PERCENTAGES = Kind(
    _draw_percentages,
    prompt="A {item} costs ${price} and is on sale for {off}% off, and then {an} {tax_rate}% "
    "sales tax is added to the sale price. What is the final price in dollars?",
    clear=(
        "The {item} costs ${price} before the sale.",
        "We need the price after the {off}% discount and then the {tax_rate}% tax.",
        "The discount is {off}% of ${price}, which is ${discount}.",
        "Taking the ${discount} off leaves a sale price of ${price} - ${discount} = ${sale}.",
        "The tax is {tax_rate}% of the ${sale} sale price, which is ${tax}.",
        "Adding the ${tax} tax gives ${sale} + ${tax} = ${answer}.",
    ),
    verbose=(
        "Let's start with the original price, which is ${price} for the {item}.",
        "First, let's figure out the discount: {off}% of ${price} is {price} * {off} / 100 = "
        "${discount}.",
        "Now that we know the discount, we can find the sale price: ${price} - ${discount} = "
        "${sale}.",
        "Next comes the tax, and it's important that it is taken on the sale price, not the "
        "original one, so it's {tax_rate}% of ${sale}, which is {sale} * {tax_rate} / 100 = "
        "${v_tax}.",
        "Adding the tax to the sale price gives ${sale} + ${v_tax} = ${v_answer}, and that's "
        "the final price of the {item}.",
    ),
    terse=(
        "discount = {price} * {off}% = {discount}",
        "sale = {price} - {discount} = {sale}",
        "tax = {sale} * {tax_rate}% = {tax}",
        "final = {sale} + {tax} = {answer}",
    ),
    slips=True,
)


def _draw_units(rng: random.Random, variant: int, slip: bool) -> dict[str, Any]:
    del slip  # No slip: a wrong length often still gives the same number of pieces.
    meters, cm = rng.randint(2, 6), rng.randrange(10, 100, 10)
    piece = rng.choice((15, 20, 25, 30, 40, 60))
    in_cm = meters * 100
    total = in_cm + cm
    pieces, spare = divmod(total, piece)
    return dict(
        thing=_LENGTHY[variant], meters=meters, cm=cm, piece=piece, in_cm=in_cm, total=total,
        answer=pieces, leftover=f" with {spare} cm left over" if spare else " exactly",
    )  # fmt: skip


UNITS = Kind(
    _draw_units,
    prompt="A {thing} is {meters} m {cm} cm long. "
    "How many pieces that are each {piece} cm long can be cut from it?",
    clear=(
        "The {thing} is {meters} m {cm} cm long, and each piece is {piece} cm.",
        "We need both lengths in the same unit, so we convert everything to centimeters.",
        "Since 1 m is 100 cm, {meters} m is {meters} * 100 = {in_cm} cm.",
        "Adding the {cm} cm to the {in_cm} cm, the whole {thing} is {in_cm} + {cm} = {total} cm.",
        "Cutting {total} cm into {piece} cm pieces gives {total} / {piece} = {answer}{leftover}.",
    ),
    verbose=(
        "The lengths are given in different units here, so let's put everything in "
        "centimeters before we divide.",
        "We know that 1 meter is 100 centimeters, so {meters} meters is {meters} * 100 = "
        "{in_cm} cm.",
        "Now that we have the meters in centimeters, we can add the extra {cm} cm, which makes "
        "the {thing} {in_cm} + {cm} = {total} cm long.",
        "Each piece needs {piece} cm, so we divide: {total} / {piece} = {answer}{leftover}, "
        "and only whole pieces count.",
    ),
    terse=(
        "len = {meters} * 100 + {cm} = {total} cm",
        "pieces = {total} // {piece} = {answer}",
    ),
)


def _draw_river(rng: random.Random, variant: int, slip: bool) -> dict[str, Any]:
    del slip  # No slip: this one is counting, not arithmetic.
    k = 2 + variant + rng.randint(0, 1)
    n = rng.randint(2 * k + 1, 6 * k)
    trips, spare = -(-n // k), n % k
    if spare:
        division = f"{n} / {k} is {n // k} with {spare} left over, so {trips} trips across"
    else:
        division = f"{n} / {k} = {trips}, so {trips} trips across"
    back = trips - 1
    return dict(n=n, k=k, trips=trips, back=back, answer=trips + back, division=division)


RIVER = Kind(
    _draw_river,
    prompt="A group of {n} campers must cross a river in a canoe that holds the guide and {k} "
    "campers, and only the guide can paddle. How many one-way crossings does the guide make?",
    clear=(
        "There are {n} campers, and each trip across carries at most {k} of them.",
        "The guide must paddle every crossing, both across the river and back.",
        "Carrying them {k} at a time, {division} are needed.",
        "The guide paddles back after every trip across except the last, so the {trips} trips "
        "across need {trips} - 1 = {back} trips back.",
        "Adding the {back} trips back to the {trips} trips across gives {trips} + {back} = "
        "{answer} crossings.",
    ),
    verbose=(
        "This is a classic river-crossing puzzle, so let's think about it carefully: we have "
        "{n} campers and a canoe that fits the guide plus {k} campers.",
        "First, let's figure out how many trips across are needed; taking {k} campers at a "
        "time, {division} are needed.",
        "Now that we know there are {trips} trips across, we can count the returns, since the "
        "canoe has to come back for each new group but not after the last trip, so there are "
        "{trips} - 1 = {back} returns.",
        "Adding both directions together gives {trips} + {back} = {answer} one-way crossings.",
    ),
    terse=(
        "across = ceil({n} / {k}) = {trips}",
        "back = {trips} - 1 = {back}",
        "crossings = {trips} + {back} = {answer}",
    ),
)


def _draw_ordering(rng: random.Random, variant: int, slip: bool) -> dict[str, Any]:
    del variant, slip  # No slip: a logic puzzle has no arithmetic to get wrong.
    p1, p2, p3, p4 = rng.sample(_RUNNERS, 4)
    ask = rng.randrange(4)
    clues = [
        rng.choice((f"{p1} finished ahead of {p2}", f"{p2} finished behind {p1}")),
        rng.choice((f"{p2} finished ahead of {p3}", f"{p3} finished behind {p2}")),
        rng.choice((f"{p3} finished ahead of {p4}", f"{p4} finished behind {p3}")),
    ]
    rng.shuffle(clues)
    w, x, y, z = sorted((p1, p2, p3, p4))
    return dict(
        p1=p1, p2=p2, p3=p3, p4=p4, w=w, x=x, y=y, z=z, clues=clues, place=_ORDINALS[ask],
        answer=(p1, p2, p3, p4)[ask],
    )  # fmt: skip


ORDERING = Kind(
    _draw_ordering,
    prompt="In a race between {w}, {x}, {y} and {z}, {clues[0]}, {clues[1]}, and {clues[2]}. "
    "Who finished {place}?",
    clear=(
        "We need to place {w}, {x}, {y} and {z} using three clues.",
        "{p1} finished ahead of {p2}, and {p2} finished ahead of {p3}, so {p1} was also ahead "
        "of {p3}.",
        "{p3} finished ahead of {p4}, so {p4} was behind {p1}, {p2} and {p3}.",
        "Nobody finished ahead of {p1}, so the order is {p1}, {p2}, {p3}, {p4}.",
        "In that order, the runner in {place} place is {answer}.",
    ),
    verbose=(
        "Let's line up the runners one clue at a time, and we have four of them: {w}, {x}, {y} "
        "and {z}.",
        "First, let's chain together the clues that share a runner: {p1} beat {p2}, and {p2} "
        "beat {p3}, so {p1}, {p2}, {p3} must be in that order.",
        "Now that we have those three in order, we can add the last clue: {p3} beat {p4}, so "
        "{p4} goes at the very end.",
        "Putting it all together, the full finishing order is {p1}, {p2}, {p3}, {p4}, and "
        "counting from the front, the {place} runner is {answer}.",
    ),
    terse=(
        "{p1} > {p2}",
        "{p2} > {p3}",
        "{p3} > {p4}",
        "1st: {p1}",
        "2nd: {p2}",
        "3rd: {p3}",
        "4th: {p4}",
    ),  # fmt: skip
)


def _draw_heads_legs(rng: random.Random, variant: int, slip: bool) -> dict[str, Any]:
    del variant, slip  # No slip: the check step would give it away.
    heads = rng.randint(12, 40)
    cows = rng.randint(3, heads - 3)
    hens = heads - cows
    legs = 2 * hens + 4 * cows
    return dict(
        heads=heads, answer=cows, hens=hens, legs=legs, base=2 * heads, extra=legs - 2 * heads,
        hen_legs=2 * hens, cow_legs=4 * cows,
    )  # fmt: skip


HEADS_LEGS = Kind(
    _draw_heads_legs,
    prompt="A farm has only chickens and cows, with {heads} heads and {legs} legs in total. "
    "How many cows are on the farm?",
    clear=(
        "Each animal has one head, so there are {heads} animals with {legs} legs.",
        "If all {heads} animals were chickens, there would be {heads} * 2 = {base} legs.",
        "Compared with those {base} legs, the extra legs are {legs} - {base} = {extra}.",
        "Each cow has 2 more legs than a chicken, so the {extra} extra legs mean "
        "{extra} / 2 = {answer} cows.",
        "That leaves {heads} - {answer} = {hens} chickens, and {hens} * 2 + {answer} * 4 = {legs} "
        "legs checks out.",
    ),
    verbose=(
        "Let's use a neat trick for this kind of puzzle: every animal has exactly one head, so "
        "there are {heads} animals in total.",
        "First, let's pretend every animal is a chicken, and then there would be {heads} * 2 = "
        "{base} legs.",
        "But the farm actually has {legs} legs, so we are short by {legs} - {base} = {extra} legs.",
        "Now, each time we swap a chicken for a cow, we gain 2 legs, which means there must be "
        "{extra} / 2 = {answer} cows.",
        "Let's double-check: {hens} chickens have {hen_legs} legs and {answer} cows have "
        "{cow_legs} legs, which adds up to {legs}.",
    ),
    terse=(
        "hens + cows = {heads}",
        "2 * hens + 4 * cows = {legs}",
        "2 * cows = {legs} - 2 * {heads} = {extra}",
        "cows = {extra} / 2 = {answer}",
    ),
)


def _draw_averages(rng: random.Random, variant: int, slip: bool) -> dict[str, Any]:
    name, she, her = _person(rng, variant)
    while True:
        scores = [rng.randint(60, 98) for _ in range(3)]
        target = rng.randint(75, 90)
        need = 4 * target - sum(scores)
        if 55 <= need <= 90:
            break
    a, b, c = scores
    goal = 4 * target
    have = a + b + c
    v_have = have + (_slip(rng, 10) if slip else 0)
    return dict(
        name=name, she=she, her=her, a=a, b=b, c=c, target=target, goal=goal, have=have,
        answer=need, v_have=v_have, v_answer=goal - v_have,
    )  # fmt: skip


AVERAGES = Kind(
    _draw_averages,
    prompt="{name} scored {a}, {b} and {c} on {her} first three tests. What score does {she} "
    "need on the fourth test to have an average of {target}?",
    clear=(
        "{name} has scores of {a}, {b} and {c}, and wants an average of {target} over four tests.",
        "We need the score on the fourth test.",
        "An average of {target} over 4 tests needs a total of 4 * {target} = {goal} points.",
        "The first three tests add up to {a} + {b} + {c} = {have} points.",
        "To reach {goal} from {have}, the fourth test must make up {goal} - {have} = {answer} "
        "points.",
    ),
    verbose=(
        "To solve this, it helps to think about the total instead of the average, since {name} "
        "has taken three tests so far, with scores of {a}, {b} and {c}.",
        "First, let's figure out the total needed: an average of {target} over 4 tests means "
        "the scores must add up to 4 * {target} = {goal}.",
        "Next, let's add up what {she} already has: {a} + {b} + {c} = {v_have}.",
        "Now that we know both totals, we can find the missing score, because the fourth test "
        "has to make up the difference of {goal} - {v_have} = {v_answer}.",
    ),
    terse=(
        "goal = 4 * {target} = {goal}",
        "have = {a} + {b} + {c} = {have}",
        "need = {goal} - {have} = {answer}",
    ),
    slips=True,
)

KINDS: tuple[Kind, ...] = (
    SHOPPING,
    SPEED,
    AGES,
    FRACTIONS,
    PERCENTAGES,
    UNITS,
    RIVER,
    ORDERING,
    HEADS_LEGS,
    AVERAGES,
)


def _disruption(order: list[int], numbers: list[set[str]]) -> int:
    """Score an order by how often a step uses an earlier step's result out of sight of it.

    A use is a number in a step that first appears in an earlier step of the natural order. Each
    use counts once when no step before it in ``order`` shows the number (used before it is
    computed), and once more when none of the two steps just before it does (out of local view).
    """
    first: dict[str, int] = {}
    for i, found in enumerate(numbers):
        for number in found:
            first.setdefault(number, i)
    score = 0
    for pos, i in enumerate(order):
        seen = set().union(*(numbers[j] for j in order[:pos]))
        near = set().union(*(numbers[j] for j in order[max(0, pos - 2) : pos]))
        for number in numbers[i]:
            if first[number] < i:
                score += (number not in seen) + (number not in near)
    return score


def scramble(
    steps: list[str], rng: random.Random, given: str = "", candidates: int = 64
) -> list[str]:
    """Shuffle steps so that the order reads wrong while every step stays the same.

    Only orders where the conclusion (the last step) lands in the first half and no two steps that
    were neighbours are neighbours any more (in either order) qualify, so the answer comes before
    the work and the original order is never returned. Of ``candidates`` such orders drawn from
    ``rng``, the one whose steps most often use results they cannot see yet wins (see
    :func:`_disruption`; the first drawn wins ties).

    Args:
        steps: Steps in their natural order (at least four); the last one is the conclusion.
        rng: The random source.
        given: Text always in view (the prompt); its numbers do not count as results.
        candidates: How many qualifying orders to draw.

    Returns:
        The same steps, reordered.
    """
    if len(steps) < 4:
        raise ValueError("need at least four steps to scramble")
    visible = set(_NUMBER.findall(given))
    numbers = [set(_NUMBER.findall(step)) - visible for step in steps]
    best: list[int] = []
    best_score = -1
    order = list(range(len(steps)))
    drawn = 0
    while drawn < candidates:
        rng.shuffle(order)
        early = order.index(len(steps) - 1) < len(steps) // 2
        if not early or any(abs(b - a) == 1 for a, b in zip(order, order[1:])):
            continue
        drawn += 1
        score = _disruption(order, numbers)
        if score > best_score:
            best, best_score = list(order), score
    return [steps[i] for i in best]


def build_rows(seed: int = SEED) -> list[dict[str, object]]:
    """Build every row of the demo dataset.

    Args:
        seed: Master seed; each prompt draws its numbers from its own generator derived from it.

    Returns:
        Rows with keys ``prompt_id``, ``prompt``, ``teacher``, ``response`` and ``correct``,
        sorted by prompt id, then teacher.
    """
    n_prompts = PROMPTS_PER_KIND * len(KINDS)
    kinds = [KINDS[i % len(KINDS)] for i in range(n_prompts)]
    # One verbose slip per kind that can carry one, in a variant drawn with the seed.
    pick = random.Random(f"{seed}:slips")
    slipped = {
        k + len(KINDS) * pick.randrange(PROMPTS_PER_KIND)
        for k, kind in enumerate(KINDS)
        if kind.slips
    }
    rows: list[dict[str, object]] = []
    for i, kind in enumerate(kinds):
        prompt_id = f"demo-{i + 1:03d}"
        variant = i // len(KINDS)
        problem = make_problem(kind, random.Random(f"{seed}:{prompt_id}"), variant, i in slipped)
        if problem.verbose_correct == (i in slipped):
            raise AssertionError(f"{prompt_id}: verbose slip did not change the answer")
        scramble_rng = random.Random(f"{seed}:{prompt_id}:scramble")
        shuffled = scramble(problem.clear, scramble_rng, given=problem.prompt)
        traces = {
            "teacher-clear": (problem.clear, True),
            "teacher-scrambled": (shuffled, True),
            "teacher-terse": (problem.terse, True),
            "teacher-verbose": (problem.verbose, problem.verbose_correct),
        }
        for teacher in TEACHERS:
            steps, correct = traces[teacher]
            rows.append(
                {
                    "prompt_id": prompt_id,
                    "prompt": problem.prompt,
                    "teacher": teacher,
                    "response": "\n".join(steps),
                    "correct": correct,
                }
            )
    return rows


def render(rows: list[dict[str, object]]) -> str:
    """Serialize rows as JSON Lines (one object per line, trailing newline)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the demo data file, or with ``--check`` verify that it is up to date.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_PATH, help="where to write the JSONL")
    parser.add_argument("--check", action="store_true", help="only check that --out is current")
    args = parser.parse_args(argv)
    text = render(build_rows())
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else None
        if current != text:
            print(f"{args.out} is out of date: run python scripts/demo_data.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {text.count(chr(10))} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
