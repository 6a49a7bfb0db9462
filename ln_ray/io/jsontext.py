"""JSON text at orjson's speed with the standard library's results.

Rows are mostly long strings, and the standard library's ``json`` spends tens of microseconds on
each 10 KB one; orjson parses and writes them several times faster. Its results differ from
``json``'s in a few places, and there ``json`` decides:

- orjson refuses NaN and Infinity, lone surrogates and very deep nesting (``json`` accepts the
  first two, and its error messages are the ones ln-ray reports);
- orjson reads an integer beyond 64 bits as a float: a value with a float, from text with 19 or
  more digits in a row (perhaps such an integer), is parsed by ``json``;
- orjson writes NaN as null and has no ``default=str``: only values that orjson itself parsed
  (``native``) are written by it.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

NOT_NATIVE = object()  # what ``loads_native`` returns where ``json`` must decide
# Every digit as "0": a run of 19 digits is then a plain substring search (a regular expression
# for it backtracks at every digit, and takes longer than parsing the line).
_ZEROS = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19


def loads_native(text: bytes | str) -> Any:
    """orjson's value of ``text``, or ``NOT_NATIVE`` where it could differ from ``json``'s (or
    orjson refuses it)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return NOT_NATIVE
    if _has_float(value):  # perhaps an integer orjson could not hold
        raw = text.encode("utf-8") if isinstance(text, str) else text
        if _LONG_RUN in raw.translate(_ZEROS):
            return NOT_NATIVE
    return value


def _has_float(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def loads(text: bytes | str) -> Any:
    """``json.loads(text)``, faster; raises what ``json.loads`` raises."""
    value = loads_native(text)
    return json.loads(text) if value is NOT_NATIVE else value


def dumps(value: Any, native: bool = False) -> str:
    """``value`` as JSON text (no ASCII escaping); raises ``RecursionError`` or ``ValueError``
    where ``json.dumps`` does.

    Args:
        value: Any value; ``json`` writes what it cannot as ``str`` gives it.
        native: ``value`` holds only what orjson parsed (``loads_native``), so orjson writes it.
    """
    if native:
        try:
            return orjson.dumps(value).decode("utf-8")
        except orjson.JSONEncodeError:  # nested past orjson's limit
            pass
    return json.dumps(value, ensure_ascii=False, default=str)
