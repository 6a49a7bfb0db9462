"""Helpers the tests share: tiny models, made-up traces and rows, reading a run's outputs.

Test files import from here, never from each other or from conftest.py (which holds fixtures).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bench.tiny import make_tiny_causal_lm
from ln_ray.config import ColumnsConfig
from ln_ray.io.run_folder import PublishedRun
from ln_ray.io.shards import blocks, iter_jsonl
from ln_ray.prepare.render import tokenize_trace

REPO = Path(__file__).resolve().parents[1]  # the checkout: tests/ sits at its top

__all__ = [
    "GOOD_ROW",
    "LONGROPE",
    "REPO",
    "SENTENCES",
    "TEACHERS",
    "TOTAL_RESPONSE",
    "TOTAL_ROW",
    "TRACE_METRICS",
    "difficulty_corpus",
    "make_rows",
    "make_tiny_causal_lm",
    "make_tiny_llama",
    "make_traces",
    "metric_trace",
    "parquet_with_a_corrupt_row_group",
    "prepared_rows",
    "tiny_job_config",
    "write_jsonl",
    "raw_table",
    "read_output",
    "scores_table",
]


def make_tiny_llama(vocab_size: int, seed: int = 0, attn: str = "eager"):
    """A 2-layer random Llama with grouped-query attention (fp32, CPU)."""
    return make_tiny_causal_lm("llama", vocab_size, seed, attn_implementation=attn)


_SENTENCES = [
    "First, compute the total cost. ",
    "3 apples at $2 each is 6 dollars. ",
    "Then add the 4 dollar sandwich.",
    "\nWait, let me double-check the arithmetic. ",
    "3 * 2 = 6 and 6 + 4 = 10. ",
    "So the answer is 10.",
    " ",
    "x",
    "\n\nThe train travels 120 km in 2 hours, so its speed is 60 km/h. ",
    "Therefore the farmer crosses the river first.",
]


def make_traces(tokenizer, count: int = 5, seed: int = 0):
    """Traces of varied length and step structure (including steps too short to own a token)."""
    rng = random.Random(seed)
    traces = []
    for i in range(count):
        steps = [rng.choice(_SENTENCES) for _ in range(rng.randint(1, 12))]
        messages = [
            {
                "role": "user",
                "content": f"Puzzle {i}: " + "what is the total? " * rng.randint(1, 4),
            },
            {"role": "assistant", "content": "".join(steps)},
        ]
        traces.append(tokenize_trace(tokenizer, messages, steps))
    return traces


TEACHERS = ("alpha", "beta", "gamma")
SENTENCES = [
    "First, compute the total cost.",
    "3 apples at $2 each is 6 dollars.",
    "Then add the 4 dollar sandwich.",
    "Wait, let me double-check the arithmetic.",
    "3 * 2 = 6 and 6 + 4 = 10.",
    "So the answer is 10.",
    "The train travels 120 km in 2 hours, so its speed is 60 km/h.",
]


def make_rows(n_prompts: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for p in range(n_prompts):
        for t, teacher in enumerate(TEACHERS):
            steps = rng.sample(SENTENCES, rng.randint(2, 5))
            rows.append(
                {
                    "prompt_id": f"q{p}",
                    "prompt": f"Puzzle {p}: what is the total?",
                    "teacher": teacher,
                    "response": " ".join(steps),
                    "correct": not (p % 3 == 0 and t == 0),
                    "source": f"batch-{p % 2}",
                }
            )
    return rows


def prepared_rows(student, raw: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Validate and tokenize raw rows as the job does: (validated, prepared accepted rows)."""
    import pyarrow.compute as pc

    from ln_ray.config import ScoringConfig, SegmentConfig
    from ln_ray.pipeline.stages import tokenize_batch, validate_batch

    settings = {"segment": SegmentConfig(), "scoring": ScoringConfig(max_response_chars=1000)}
    validated = validate_batch(raw, student=student, **settings)
    accepted = validated.filter(pc.is_null(validated["reject_reason"]))
    return validated, tokenize_batch(accepted, student=student, **settings)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """``rows`` as a JSONL shard (its folder made)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def tiny_job_config(input_path, output_path, student: str, *extra: str):
    """A job over ``input_path`` with a tiny student: small batches and packs, few resamples."""
    from ln_ray.config import load_config

    return load_config(
        "default",
        [
            f"input.path={input_path}",
            f"output.path={output_path}",
            f"student.model={student}",
            "compute.batch_traces=2",
            "compute.token_budget=256",
            "selection.bootstrap_samples=100",
            *extra,
        ],
    )


def read_output(url: str, name: str) -> pd.DataFrame:
    """An output of the run published under ``url``, found through its manifest."""
    return PublishedRun.open(url).table(name)


def parquet_with_a_corrupt_row_group(rows: list[dict]) -> bytes:
    """The rows in row groups of three; the second group's response page is garbage."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer, row_group_size=3)
    data = bytearray(buffer.getvalue())
    shard = pq.ParquetFile(io.BytesIO(bytes(data)))
    column = shard.schema_arrow.get_field_index("response")
    page = shard.metadata.row_group(1).column(column).data_page_offset
    data[page : page + 6] = b"\xff" * 6
    return bytes(data)


# Phi-3's longrope: long factors for any sequence longer than 80 tokens (4096 in Phi-3.5-mini).
LONGROPE = {
    "rope_parameters": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * 8,
        "long_factor": [4.0] * 8,
        "original_max_position_embeddings": 80,
    },
    "original_max_position_embeddings": 80,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# One prompt with a two-sentence response.
TOTAL_RESPONSE = (
    "First, compute the total cost. 3 apples at $2 each is 6 dollars.\nSo the answer is 6."
)
TOTAL_ROW = {
    "prompt_id": "q1",
    "prompt": "What is the total?",
    "teacher": "t1",
    "response": TOTAL_RESPONSE,
}

# A valid input row, as a teacher shard holds it.
GOOD_ROW = {
    "prompt_id": 1,
    "prompt": "Q?",
    "teacher": "t",
    "response": "First, add the numbers. Then we are done.",
}


def raw_table(lines: bytes, columns: ColumnsConfig | None = None) -> pa.Table:
    """JSONL ``lines`` as the reader's blocks (``RAW_SCHEMA``), concatenated."""
    rows = iter_jsonl(io.BytesIO(lines), columns or ColumnsConfig())
    return pa.concat_tables(list(blocks(rows, "mem://shard.jsonl")))


TRACE_METRICS = [
    *("lalp", "lalp_drop1", "galp", "lalp_token", "ifd", "ifd_ppl"),
    *("rsr", "avg_rank", "avg_surprisal"),
]


def scores_table(rows: list[dict]) -> pa.Table:
    """Score rows with trace ids ``t0, t1, ...`` in order."""
    return pa.Table.from_pylist(
        [{"trace_id": f"t{i}", **row} for i, row in enumerate(rows)],
    )


def metric_trace(prompt: str, teacher: str, value: float, **extra) -> dict:
    """A scored trace whose every metric is ``value`` (ranks and surprisals kept positive)."""
    row = {m: value for m in TRACE_METRICS}
    row.update(avg_rank=abs(value) + 1.0, avg_surprisal=abs(value) + 2.0)
    row.update(prompt_id=prompt, teacher=teacher, **extra)
    return row


def difficulty_corpus(prompts: int = 30, seed: int = 0) -> pa.Table:
    """Teacher "a" is 0.3 better than "b" on every prompt, prompts differ by several units."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(prompts):
        base = rng.normal(0, 5)
        rows.append(metric_trace(f"p{p:03d}", "a", base + 0.3 + rng.normal(0, 0.02)))
        rows.append(metric_trace(f"p{p:03d}", "b", base + rng.normal(0, 0.02)))
    return scores_table(rows)


WINDOW = 8  # every sliding window below: shorter than the traces' prefixes and responses
# Every covered family's tiny student: its config settings under test.
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    # Gemma-3: local layers with a window, global layers without one (per layer type).
    "gemma3_text": {
        "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": {"sliding_window": WINDOW, "pad_token_id": 0},
    "olmo2": {},
    "granite": {"logits_scaling": 8.0},  # logits / 8
    "hyperclovax": {"logits_scaling": 0.25},  # logits * 0.25: the same name, another meaning
    "cohere": {"logit_scale": 0.5},  # logits * 0.5
}
