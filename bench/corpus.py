"""Benchmark traces: real multi-teacher reasoning traces when present, else a generated corpus.

The real traces (``../shared/data/misguided_attention_traces.parquet`` next to the repository, or
``--data PATH``) are long chain-of-thought answers from ten reasoning models. Without them, long
traces are stitched together from the embedded demo sample's sentences, so the benchmark still runs
on a fresh machine. Either way every trace is prepared by ln-ray's own preparation code.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ln_ray.prepare.render import TokenizedTrace, tokenize_trace
from ln_ray.prepare.rows import prepare_row
from ln_ray.prepare.segment import segment_steps

REPO = Path(__file__).resolve().parent.parent
REAL_TRACES = REPO.parent / "shared" / "data" / "misguided_attention_traces.parquet"
DEMO_TRACES = REPO / "ln_ray" / "demo" / "traces.jsonl"


@dataclass
class Corpus:
    """Raw rows (for the Ray job) and their tokenized traces (for the scorers), in one order."""

    source: str
    rows: list[dict[str, Any]]
    traces: list[TokenizedTrace]

    @property
    def response_tokens(self) -> int:
        return sum(t.n_response for t in self.traces)


def load_rows(data: str | None) -> tuple[str, list[dict[str, Any]]]:
    """Every benchmark row: the real traces if their file exists, else a generated corpus."""
    path = Path(data) if data else REAL_TRACES
    if path.is_file():
        table = pq.read_table(path, columns=["prompt_id", "prompt", "teacher", "response"])
        return str(path), table.to_pylist()
    return "generated from the demo sample", _generated_rows()


def pick_corpus(
    rows: list[dict[str, Any]],
    source: str,
    tokenizer: Any,
    *,
    n_traces: int,
    min_tokens: int,
    max_tokens: int,
    seed: int = 0,
) -> Corpus:
    """``n_traces`` rows whose responses have ``min_tokens..max_tokens`` tokens, one per teacher
    where possible, prepared exactly as the job prepares them."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    picked, traces, teachers, taken = [], [], set(), set()
    for second_pass in (False, True):
        for index in order:
            row = rows[index]
            if len(picked) == n_traces:
                break
            if (not second_pass and row["teacher"] in teachers) or index in taken:
                continue
            # About four characters a token: skip rows that cannot fit before tokenizing them.
            if not min_tokens * 2 <= len(row["response"]) <= max_tokens * 6:
                continue
            prepared = prepare_row(row, tokenizer)
            if min_tokens <= prepared.tokens.n_response <= max_tokens:
                picked.append(row)
                taken.add(index)
                traces.append(prepared.tokens)
                teachers.add(row["teacher"])
    if len(picked) < n_traces:
        raise SystemExit(f"only {len(picked)} traces of {min_tokens}-{max_tokens} tokens found")
    return Corpus(source=source, rows=picked, traces=traces)


def sized_trace(rows: list[dict[str, Any]], tokenizer: Any, n_tokens: int) -> TokenizedTrace:
    """A trace of exactly ``n_tokens`` response tokens: the longest responses' sentences joined
    (real text, real step lengths), cut at ``n_tokens``."""
    longest = sorted(rows, key=lambda r: -len(r["response"]))
    prompt = longest[0]["prompt"]
    steps: list[str] = []
    chars = 0
    for row in longest:
        for step in segment_steps(row["response"]):
            steps.append(step)
            chars += len(step)
        if chars > n_tokens * 5:
            break
    messages = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": "".join(steps)},
    ]
    full = tokenize_trace(tokenizer, messages, steps)
    if full.n_response < n_tokens:
        raise SystemExit(f"the corpus has fewer than {n_tokens} tokens of text")
    bounds = np.minimum(full.step_bounds, n_tokens)
    last = int(np.searchsorted(bounds, n_tokens, side="left"))
    return TokenizedTrace(
        input_ids=full.input_ids[: full.prefix_len + n_tokens],
        prefix_len=full.prefix_len,
        step_bounds=bounds[: last + 1],
    )


def first_steps(trace: TokenizedTrace, n_steps: int) -> TokenizedTrace:
    """The trace cut after its first ``n_steps`` steps (a small call for warming up)."""
    n_steps = min(n_steps, trace.n_steps)
    stop = int(trace.step_bounds[n_steps])
    return TokenizedTrace(
        input_ids=trace.input_ids[: trace.prefix_len + stop],
        prefix_len=trace.prefix_len,
        step_bounds=trace.step_bounds[: n_steps + 1],
    )


def _generated_rows(n_prompts: int = 12, target_chars: int = 7_000) -> list[dict[str, Any]]:
    """Long traces made of the demo sample's sentences, shuffled per (prompt, teacher)."""
    demo = [json.loads(line) for line in DEMO_TRACES.read_text().splitlines() if line.strip()]
    sentences = [s for row in demo for s in segment_steps(row["response"])]
    teachers = sorted({row["teacher"] for row in demo})
    rng = random.Random(0)
    rows = []
    for p in range(n_prompts):
        prompt = demo[p % len(demo)]["prompt"]
        for teacher in teachers:
            text: list[str] = []
            while sum(map(len, text)) < target_chars:
                text.append(rng.choice(sentences))
            rows.append(
                {
                    "prompt_id": f"gen-{p}",
                    "prompt": prompt,
                    "teacher": teacher,
                    "response": "".join(text),
                }
            )
    return rows
