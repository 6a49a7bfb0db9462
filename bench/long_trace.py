"""Score one trace of N response tokens in a fresh process; print time and peak memory as JSON.

A fresh process per trace keeps the peak resident set honest: the peak is reset (Linux
``clear_refs``) once the student is loaded and has scored a few steps, so ``peak_rss_gb -
rss_before_gb`` is what scoring the trace needs on top of the model, the interpreter and its
libraries.

    python -m bench.long_trace --tokens 32768
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.corpus import first_steps, load_rows, sized_trace
from ln_ray.config import ComputeConfig, ScoringConfig, StudentConfig
from ln_ray.score.scorer import StudentScorer
from ln_ray.score.student import load_student


def resident_gb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--window", type=int, default=ScoringConfig.window)
    parser.add_argument("--token-budget", type=int, default=ComputeConfig.token_budget)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    student = load_student(StudentConfig(), torch.device(args.device))
    _, rows = load_rows(args.data)
    trace = sized_trace(rows, student.tokenizer, args.tokens)
    scorer = StudentScorer(
        student.model,
        window=args.window,
        max_tokens=args.tokens + trace.prefix_len,
        token_budget=args.token_budget,
    )
    model_gb = sum(p.numel() * p.element_size() for p in student.model.parameters()) / 1e9
    # A first small call pages the weights in (they load memory-mapped) and warms the allocator.
    scorer.score([first_steps(trace, 8)])
    scorer.seconds = {"global": 0.0, "local": 0.0}
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the current set
    cuda = student.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = resident_gb("VmRSS")
    started = time.perf_counter()
    result = scorer.score([trace])[0]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "response_tokens": trace.n_response,
                "prefix_tokens": trace.prefix_len,
                "steps": trace.n_steps,
                "model_tokens": result.model_tokens,
                "seconds": seconds,
                "global_s": scorer.seconds["global"],
                "local_s": scorer.seconds["local"],
                "rss_before_gb": before,
                "peak_rss_gb": resident_gb("VmHWM"),
                "model_gb": model_gb,
                "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
                "lalp": result.lalp,
                "galp": result.galp,
            }
        )
    )


if __name__ == "__main__":
    main()
