"""Helpers the tests share: tiny models, made-up traces and rows, reading a run's outputs.

Test files import from here, never from each other or from conftest.py (which holds fixtures).
"""

from __future__ import annotations

import io
import random

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bench.tiny import make_tiny_causal_lm
from ln_ray.pipeline.outputs import published_manifest, read_published
from ln_ray.prepare.render import tokenize_trace

__all__ = [
    "SENTENCES",
    "TEACHERS",
    "make_rows",
    "make_tiny_causal_lm",
    "make_tiny_llama",
    "make_traces",
    "parquet_with_a_corrupt_row_group",
    "read_output",
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


def read_output(url: str, name: str) -> pd.DataFrame:
    """An output of the run published under ``url``, found through its manifest."""
    return read_published(url, published_manifest(url), name)


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
