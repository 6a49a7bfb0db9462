"""How far the packed scorer and a plain transformers forward drift apart by rounding alone: the
noise the self-check's tolerances (ln_ray/score/proof.py) must sit above. Prints JSON.

The probe is the self-check's own, with a sliding window pretended so that one trace runs long.

    python -m bench.proof_noise --dtype float32 --long 1500
    python -m bench.proof_noise --dtype bfloat16 --long 1500 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ln_ray.config import ScoringConfig, StudentConfig
from ln_ray.score.attention import plain_forward
from ln_ray.score.proof import probe_traces, reference_logprobs
from ln_ray.score.scorer import StudentScorer
from ln_ray.score.student import load_student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=StudentConfig.model)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--long", type=int, default=1500, help="the long trace's window")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    window = ScoringConfig.window
    student = load_student(
        StudentConfig(model=args.model, dtype=args.dtype), torch.device(args.device)
    )
    scorer = StudentScorer(student.model, window=window)
    vocab = student.model.get_input_embeddings().num_embeddings
    traces = probe_traces(vocab, window, None, args.long)
    started = time.perf_counter()
    fast = scorer.score(traces)
    found, every = [], []
    with torch.inference_mode(), plain_forward(student.model):
        for trace, scores in zip(traces, fast):
            reference = reference_logprobs(student.model, trace, window, None, scorer.max_tokens)
            for kind, got, want in zip(
                ("global", "local"), (scores.global_logprobs, scores.local_logprobs), reference
            ):
                diff = np.abs(np.asarray(got, np.float64) - want)
                every.append(diff)
                found.append(
                    {
                        "tokens": len(trace.input_ids),
                        "pass": kind,
                        "largest": float(diff.max()),
                        "mean": float(diff.mean()),
                    }  # fmt: skip
                )
    print(
        json.dumps(
            {
                "model": args.model,
                "dtype": args.dtype,
                "device": args.device,
                "largest": max(f["largest"] for f in found),
                "mean": float(np.concatenate(every).mean()),
                "per_sequence": found,
                "seconds": round(time.perf_counter() - started, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
