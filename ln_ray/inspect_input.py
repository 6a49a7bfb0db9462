"""``ln-ray inspect``: how the job will read an input, from a sample of it, before a run.

It lists the files and their formats, the layout it reads (where the conversation, the teacher and
the prompt ids come from), how many sampled rows each canonical column was found in, the rows
per teacher in the sample and the reasons sampled rows would be rejected. Then it renders sample
rows as the student sees them: the context, the generation prompt, the scored response cut into
its steps, and the end-of-turn that is never scored. It reads the first rows of a few files only,
never the whole input. No Ray, no model weights: the student's tokenizer and template only.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ln_ray.config import LnRayConfig, prepare_options, render_options
from ln_ray.io import storage
from ln_ray.io.shards import iter_jsonl, iter_parquet
from ln_ray.prepare.layout import PER_PROMPT
from ln_ray.prepare.render import context_text, render_trace
from ln_ray.prepare.rows import RowRejected, prepare_row

CANONICAL = ("prompt_id", "prompt", "response", "reasoning", "teacher", "messages", "system")
CANONICAL += ("steps", "correct")


@dataclass
class Sampled:
    """What a sample of the input holds."""

    files: list[tuple[str, str]]
    skipped: list[str]
    samples: int  # rows to render
    read_from: int = 0  # files the sample was read from
    rows: list[dict[str, Any]] = field(default_factory=list)
    found: Counter = field(default_factory=Counter)  # canonical column -> rows holding it
    sharegpt: int = 0  # rows whose messages are ShareGPT-style
    teachers: Counter = field(default_factory=Counter)
    rejects: dict[str, list[str]] = field(default_factory=dict)  # reason -> rows (where)
    rendered: list[str] = field(default_factory=list)


def inspect_input(cfg: LnRayConfig, rows: int = 200, files: int = 4, samples: int = 2) -> str:
    """A report of how the job reads ``cfg.input``, from the first ``rows`` rows spread over up
    to ``files`` files, with ``samples`` rows rendered as the student sees them.

    Raises:
        storage.InputError: The input has no readable files, or a file's path names no teacher
            under ``input.teacher_from_path``.
    """
    from ln_ray.score.student import load_tokenizer

    inputs = storage.Inputs.list(cfg.input.path, cfg.input.format)
    from_path = inputs.path_fields(cfg.input.teacher_from_path)
    sampled = Sampled(inputs.files, inputs.skipped, samples)
    step = max(1, len(inputs.files) // files)
    chosen = inputs.files[::step][:files]
    sampled.read_from = len(chosen)
    per_file = max(1, rows // len(chosen))
    for path, fmt in chosen:
        reader = iter_parquet if fmt == "parquet" else iter_jsonl
        with inputs.fs.open(path, "rb") as handle:
            read = reader(
                handle, cfg.input.columns, from_path=from_path.get(path), layout=cfg.input.layout
            )
            for raw in itertools.islice(read, per_file):
                sampled.rows.append({**raw, "source_file": inputs.shown(path)})
    tokenizer = load_tokenizer(cfg.student)
    for raw in sampled.rows:
        _count(sampled, raw, cfg, tokenizer)
    return _report(cfg, sampled, rows_per_file=per_file)


def _count(sampled: Sampled, raw: dict[str, Any], cfg: LnRayConfig, tokenizer: Any) -> None:
    for key in CANONICAL:
        if raw.get(key) is not None:
            sampled.found[key] += 1
    messages = raw.get("messages")
    if isinstance(messages, str) and '"from"' in messages and '"value"' in messages:
        sampled.sharegpt += 1
    sampled.teachers[raw.get("teacher") or "(none)"] += 1
    where = f"{raw['source_file']} row {raw['row_number']}"
    if raw.get("item") is not None:
        where += f" item {raw['item']}"
    try:
        if raw.get("read_error"):
            raise RowRejected(raw["read_error"])
        trace = prepare_row(raw, tokenizer, **prepare_options(cfg))
    except RowRejected as exc:
        sampled.rejects.setdefault(f"{exc} ({exc.kind})", []).append(where)
        return
    if len(sampled.rendered) < sampled.samples:
        sampled.rendered.append(_rendered(trace, where, cfg, tokenizer))


def _rendered(trace: Any, where: str, cfg: LnRayConfig, tokenizer: Any) -> str:
    """One trace as the student sees it, each part marked."""
    options = render_options(cfg.student, cfg.scoring)
    messages = trace.row.messages
    rendered = render_trace(tokenizer, messages, options)
    prefix, end = rendered.text[: rendered.start], rendered.text[rendered.stop :]
    tokens = trace.tokens
    bounds = tokens.step_bounds.tolist()
    head = (
        f"── {where}: teacher {trace.row.teacher!r}, prompt_id {trace.row.prompt_id!r}, "
        f"{tokens.prefix_len} prompt tokens, {tokens.n_response} scored tokens in "
        f"{tokens.n_steps} steps"
    )
    lines = [head]
    if options.view == "generation":
        context = context_text(tokenizer, messages[:-1], options.template_kwargs)
        opening = prefix[len(context) :] if prefix.startswith(context) else ""
        lines += _block("context", prefix[: len(prefix) - len(opening)])
        lines += _block("generation prompt (not scored)", opening)
    else:
        lines += _block("context", prefix)
    if rendered.skipped:
        skipped = trace.row.response[: rendered.skipped]
        lines += _block("read in the generation prompt (not scored)", skipped)
    lines.append("⟦response: scored, step by step⟧")
    for number, (step, a, b) in enumerate(zip(trace.steps, bounds, bounds[1:]), start=1):
        lines.append(f"  [{number}: {b - a} tokens] {json.dumps(step, ensure_ascii=False)}")
    lines += _block("end of turn (never scored)", end)
    return "\n".join(lines)


def _block(name: str, text: str) -> list[str]:
    return [f"⟦{name}⟧", *(f"  {line}" for line in (text or "(nothing)").splitlines() or [""])]


def _report(cfg: LnRayConfig, sampled: Sampled, rows_per_file: int) -> str:
    formats = Counter(fmt for _, fmt in sampled.files)
    columns = cfg.input.columns
    unit = "traces" if cfg.input.layout == PER_PROMPT else "rows"
    lines = [
        f"input {storage.redact_url(cfg.input.path)}: {len(sampled.files)} files "
        f"({', '.join(f'{n} {fmt}' for fmt, n in sorted(formats.items()))})"
        + (f", {len(sampled.skipped)} skipped for their suffix" if sampled.skipped else ""),
        f"sample: the first {rows_per_file} {unit} of {sampled.read_from} files, "
        f"{len(sampled.rows)} {unit}",
        f"layout: {_layout(cfg)}; {_conversation(sampled, cfg)}; {_teacher(cfg)}",
        "",
        "column          read from                     found in",
    ]
    for key in CANONICAL:
        name = getattr(columns, key)
        if key == "response" and cfg.input.layout == PER_PROMPT:
            name = f"{columns.responses}[item]"
        found = sampled.found[key]
        lines.append(f"  {key:<14}{name:<30}{found} of {len(sampled.rows)} rows")
    lines += ["", "rows per teacher in the sample:"]
    lines += [f"  {teacher}: {n}" for teacher, n in sampled.teachers.most_common()]
    rejected = sum(len(rows) for rows in sampled.rejects.values())
    lines += ["", f"would be rejected: {rejected} of {len(sampled.rows)} sampled rows"]
    common = sorted(sampled.rejects.items(), key=lambda item: -len(item[1]))[:10]
    lines += [f"  {len(rows)} x {reason}, first {rows[0]}" for reason, rows in common]
    lines += ["", f"as the student sees them (the first {sampled.samples} accepted rows):"]
    lines += sampled.rendered or ["  (no sampled row would be scored)"]
    return "\n".join(lines) + "\n"


def _layout(cfg: LnRayConfig) -> str:
    if cfg.input.layout == PER_PROMPT:
        return (
            f"one row per prompt, each response in its list {cfg.input.columns.responses!r} "
            "a trace (item 0, 1, ...)"
        )
    return "one row per trace"


def _conversation(sampled: Sampled, cfg: LnRayConfig) -> str:
    columns = cfg.input.columns
    if cfg.input.layout == PER_PROMPT:
        return f"conversation from {columns.prompt!r} and each of {columns.responses!r}"
    if sampled.found["messages"]:
        style = "ShareGPT-style" if sampled.sharegpt else "OpenAI-style"
        return f"conversation from {columns.messages!r} ({style})"
    return f"conversation from {columns.prompt!r} and {columns.response!r}"


def _teacher(cfg: LnRayConfig) -> str:
    spec = cfg.input.teacher_from_path
    if spec is None:
        named = f"teacher from column {cfg.input.columns.teacher!r}"
        if cfg.input.layout == PER_PROMPT:
            named += f" (else {cfg.input.columns.responses}[item])"
        return named
    return "teacher from the path (" + ("teacher=NAME/ folders" if spec == "hive" else spec) + ")"
