"""orjson's speed with the standard library's results (ln_ray/io/jsontext.py)."""

from __future__ import annotations

import io
import json
import math
import random

from ln_ray.config import ColumnsConfig
from ln_ray.io import jsontext
from ln_ray.io.shards import iter_jsonl


def same(a, b) -> bool:
    """Equal values of equal types all the way down (NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:  # integers of every size, past 64 bits too
        return rng.choice([1, -1]) * rng.randrange(10 ** rng.randrange(1, 30))
    if kind == 2:
        return rng.choice([rng.uniform(-1e6, 1e6), 1e300 * rng.random(), 0.1, -0.0, 1e-320])
    if kind in (3, 4, 5):
        alphabet = 'ab \n\t"\\/é中😀\u2028\x00\x1f0123456789'
        return "".join(rng.choices(alphabet, k=rng.randrange(30)))
    if kind in (6, 7):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{rng.randrange(5)}": random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def test_loads_gives_what_json_gives_on_random_values():
    rng = random.Random(0)
    for _ in range(3000):
        text = json.dumps(random_value(rng), ensure_ascii=rng.random() < 0.5)
        expected = json.loads(text)
        assert same(jsontext.loads(text), expected), text
        assert same(jsontext.loads(text.encode("utf-8")), expected), text


def test_loads_gives_what_json_gives_where_orjson_differs():
    texts = [
        '{"n": 123456789012345678901234567890, "x": 1.5}',  # orjson: a float
        '{"n": -9223372036854775809, "x": 0.5}',
        '{"n": 18446744073709551615}',  # the largest integer orjson holds
        '{"x": NaN, "y": Infinity, "z": -Infinity}',  # orjson refuses these
        '{"x": 1e400}',
        '{"a": 1, "a": 2}',  # the last copy of a key wins, in both
        '{"s": "\\ud83d\\ude00 and \\u00e9"}',
        '{"s": "\\ud800"}',  # a lone surrogate: json keeps it
        "[" * 300 + "]" * 300,  # deeper than orjson writes back
    ]
    for text in texts:
        assert same(jsontext.loads(text), json.loads(text)), text
    assert jsontext.loads_native('{"x": NaN}') is jsontext.NOT_NATIVE
    assert jsontext.loads_native('{"n": 1234567890123456789012, "x": 0.5}') is jsontext.NOT_NATIVE
    assert jsontext.loads_native('{"n": 12345678901234567890}') == {"n": 12345678901234567890}


def test_dumps_round_trips_native_values_and_writes_the_rest_as_json_does():
    rng = random.Random(1)
    for _ in range(2000):
        text = json.dumps(random_value(rng))
        value = jsontext.loads_native(text)
        if value is jsontext.NOT_NATIVE:
            continue
        assert same(json.loads(jsontext.dumps(value, native=True)), value), text
    deep = json.loads("[" * 300 + "]" * 300)  # past orjson's depth: json writes it
    assert jsontext.dumps(deep, native=True) == json.dumps(deep)
    odd = {"x": float("nan"), "big": 2**70, "s": "é"}
    assert jsontext.dumps(odd) == json.dumps(odd, ensure_ascii=False)


def test_jsonl_rows_read_the_same_on_either_parser():
    base = {"prompt": "Q?", "teacher": "t", "response": "So it is 4."}
    records = [
        {**base, "prompt_id": 123456789012345678901234567890, "score": 0.5},
        {**base, "prompt_id": 7, "note": {"big": 2**80, "f": 1.25}},
        {**base, "prompt_id": "q", "note": float("nan")},
        {**base, "prompt_id": 8, "note": ["é", {"k": None}]},
    ]
    lines = b"\n".join(json.dumps(r).encode() for r in records)
    rows = list(iter_jsonl(io.BytesIO(lines), ColumnsConfig()))
    assert [r["prompt_id"] for r in rows] == ["123456789012345678901234567890", "7", "q", "8"]
    assert all(r["read_error"] is None for r in rows)
    for row, record in zip(rows, records):
        extra = {k: v for k, v in record.items() if k not in (*base, "prompt_id")}
        assert same(json.loads(row["extra"]), extra)
