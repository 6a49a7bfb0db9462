"""The layouts distillation corpora ship in, beyond one row per trace with a teacher column.

A row may hold one prompt and a list of responses (``input.layout: per_prompt``, as OpenR1-Math
ships: ``io.canonical.canonical_rows`` explodes it into traces).

ShareGPT conversations (``from``/``value``, ``human``/``gpt``) map onto chat roles
(``sharegpt_message``). Nested fields are named by dotted paths (``nested_field``).

The fields an input file's path names give the teacher (and, optionally, the prompt set) of every
row in it, for corpora laid out as a file or folder per teacher (``input.teacher_from_path``).

``hive`` reads ``teacher=NAME`` (and ``prompt_set=NAME``) folders, as Hive-style partitioned
datasets write them (``traces/teacher=qwq/part-0.parquet``). Anything else is a regular
expression searched in the file's path (without its protocol), with a named group ``teacher``
and optionally one named ``prompt_set``: ``(?P<teacher>[^/]+)_(?P<prompt_set>\\w+)\\.jsonl$``
reads ``traces/DeepSeek-R1_gpqa.jsonl``. Ray-free.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

# input.layout: a row is one trace, or one prompt with a list of responses (exploded on read).
PER_TRACE, PER_PROMPT = "per_trace", "per_prompt"
LAYOUTS = (PER_TRACE, PER_PROMPT)
HIVE = "hive"
# ShareGPT's senders as chat roles (OpenThoughts, Bespoke-Stratos, LLaMA-Factory's sharegpt format).
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
FIELDS = ("teacher", "prompt_set")


class PathFieldsError(ValueError):
    """The setting is not a usable pattern, or a file's path does not match it."""


def check_pattern(spec: str) -> str | None:
    """What is wrong with an ``input.teacher_from_path`` setting, or None."""
    if spec == HIVE:
        return None
    try:
        pattern = re.compile(spec)
    except re.error as exc:
        return f"input.teacher_from_path is not a regular expression ({exc}): {spec!r}"
    if "teacher" not in pattern.groupindex:
        return (
            f"input.teacher_from_path {spec!r} has no group named teacher: write it as "
            "(?P<teacher>...), or set it to 'hive' for teacher=NAME/ folders"
        )
    return None


def path_fields(path: str, spec: str) -> dict[str, str]:
    """The fields ``path`` names under ``spec`` (``teacher``, and ``prompt_set`` if named).

    Raises:
        PathFieldsError: The path names no teacher (the message says which path and setting).
    """
    bare = path.split("://", 1)[-1]
    if spec == HIVE:
        found: dict[str, str] = {}
        for part in bare.split("/")[:-1]:
            key, sep, value = part.partition("=")
            if sep and key in FIELDS and value:
                found[key] = urllib.parse.unquote(value)
    else:
        match = re.search(spec, bare)
        groups = match.groupdict() if match else {}
        found = {key: groups[key] for key in FIELDS if groups.get(key)}
    if "teacher" not in found:
        why = "no teacher=NAME/ folder holds it" if spec == HIVE else f"it does not match {spec!r}"
        raise PathFieldsError(
            f"input.teacher_from_path: {bare} names no teacher ({why}); set "
            "input.teacher_from_path to a pattern every input file's path matches, or leave it "
            "unset and give the rows a teacher column"
        )
    return found


# Chat roles as ShareGPT's senders, for a curated set written in ShareGPT form.
SHAREGPT_SENDERS = {"user": "human", "assistant": "gpt", "system": "system"}


def as_sharegpt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Chat messages as ShareGPT's (``from``, ``value``); a role ShareGPT has no name for keeps
    its own."""
    return [
        {"from": SHAREGPT_SENDERS.get(m["role"], m["role"]), "value": m["content"]}
        for m in messages
    ]


def sharegpt_message(message: dict) -> tuple[str, str] | None:
    """A ShareGPT message (``from``, ``value``) as (role, content), or None if it is not one.

    Raises:
        ValueError: Its sender is none that ShareGPT corpora use (the message says which).
    """
    if "role" in message or "from" not in message:
        return None
    sender, content = message["from"], message.get("value")
    role = SHAREGPT_ROLES.get(sender) if isinstance(sender, str) else None
    if role is None:
        raise ValueError(f"a ShareGPT message is from {sender!r}, none of {sorted(SHAREGPT_ROLES)}")
    return role, content


def nested_field(record: dict[str, Any], name: str) -> Any:
    """The record's column ``name``, or the nested field its dotted path names (None if
    absent): ``info.think_content`` reads ``record["info"]["think_content"]`` unless the record
    has a column of that very name."""
    if name in record or "." not in name:
        return record.get(name)
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def other_columns(record: dict[str, Any], names: Any) -> dict[str, Any]:
    """The record's columns that no canonical column took, without the nested fields taken."""
    others, emptied = dict(record), set()
    for name in names:
        if name in record:
            others.pop(name, None)
            continue
        *parents, leaf = name.split(".")
        if not parents or parents[0] not in others:
            continue
        copied = others  # copy the path down to the leaf, never the input's own objects
        for part in parents:
            if not isinstance(copied.get(part), dict):
                break
            copied[part] = dict(copied[part])
            copied = copied[part]
        else:
            if copied.pop(leaf, None) is not None:
                emptied.add(parents[0])
    return {k: v for k, v in others.items() if not (k in emptied and _empty(v))}


def _empty(value: Any) -> bool:
    """A dict holding nothing but empty dicts (what a nested field leaves once taken)."""
    return isinstance(value, dict) and all(_empty(item) for item in value.values())
