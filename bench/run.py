"""ln-ray's benchmark: the scorer vs a naive scorer, a dense forward, the whole job, long traces.

Every figure is a ratio of two timings taken in this one run, on this machine, with the same student
(SmolLM2-135M-Instruct by default), so the noise of a shared machine mostly cancels. Prints a table
and writes ``bench/results.json``; ``docs/BENCHMARKS.md`` records the runs.

    python -m bench.run                      # what `make bench` runs
    python -m bench.run --traces 4 --skip-job --skip-long   # a quick look

``scoring.ifd``'s cost is measured apart (``ifd_model_token_share``: the model tokens it adds
over the scorer's without it; ``ifd_time_share``: the time), so that the other figures compare
like with like: the naive scorer and the dense forward compute no IFD, and the job is run with
it off.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.baselines import NaiveScorer, dense_forward
from bench.corpus import REPO, Corpus, first_steps, load_rows, pick_corpus
from ln_ray.config import ComputeConfig, ScoringConfig, StudentConfig, load_config
from ln_ray.prepare.render import unconditional_context
from ln_ray.score.scorer import StudentScorer
from ln_ray.score.student import load_student

TARGETS = {  # figure: (comparison, target); the CPU targets ln-ray is held to
    "speedup_vs_naive": (">=", 3.0),
    "efficiency_vs_dense_forward": (">=", 0.85),
    "job_overhead": ("<=", 0.20),
    "peak_mem_32k_over_model_gb": ("<=", 1.0),
    "linearity_32k_over_1k": ("<=", 42.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", help="Parquet of traces (default: the shared real traces)")
    parser.add_argument("--traces", type=int, default=8, help="traces in the corpus")
    parser.add_argument("--min-tokens", type=int, default=1500)
    parser.add_argument("--max-tokens", type=int, default=3500)
    parser.add_argument("--window", type=int, default=ScoringConfig.window)
    parser.add_argument("--token-budget", type=int, default=ComputeConfig.token_budget)
    parser.add_argument("--batch-traces", type=int, default=ComputeConfig.batch_traces)
    parser.add_argument("--naive-batch", type=int, default=8, help="windows per padded batch")
    parser.add_argument("--long-tokens", type=int, default=32768)
    parser.add_argument("--short-tokens", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--skip-job", action="store_true")
    parser.add_argument("--skip-long", action="store_true")
    parser.add_argument("--skip-ifd", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    student = load_student(StudentConfig(), device)
    plain = load_student(StudentConfig(), device)  # ordinary attention, for the baselines
    source, rows = load_rows(args.data)
    corpus = pick_corpus(
        rows,
        source,
        student.tokenizer,
        n_traces=args.traces,
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
    )
    print(
        f"corpus: {len(corpus.traces)} traces, {corpus.response_tokens} response tokens "
        f"({source}); device {device}, {torch.get_num_threads()} threads",
        flush=True,
    )
    figures: dict[str, Any] = {}
    details: dict[str, Any] = {}

    scorer = StudentScorer(student.model, window=args.window, token_budget=args.token_budget)
    naive = NaiveScorer(
        plain.model,
        window=args.window,
        batch_size=args.naive_batch,
        pad_id=plain.tokenizer.pad_token_id or 0,
    )
    _warm_up(corpus, scorer, naive, plain.model, args)
    naive.model_tokens = 0

    batches = [
        corpus.traces[a : a + args.batch_traces]
        for a in range(0, len(corpus.traces), args.batch_traces)
    ]

    def score_all() -> list:
        return [r for batch in batches for r in scorer.score(batch)]

    ln_s, ours = timed(score_all, device)
    model_tokens = sum(r.model_tokens for r in ours)
    plans = [scorer.plan(batch) for batch in batches]
    scored_rows = sum(
        len(seq.targets) for plan in plans for seq in plan.global_sequences + plan.window_sequences
    )
    print(f"ln-ray scorer   {ln_s:8.1f} s", flush=True)
    tokens = corpus.response_tokens
    params = _body_parameters(student.model)
    head_params = student.model.get_output_embeddings().weight.numel()
    ln_flops = 2 * params * model_tokens + 2 * head_params * scored_rows
    gemm_flops = _matmul_flops(device, student.dtype)
    figures["gemm_fraction"] = 2 * params * model_tokens / ln_s / gemm_flops
    details.update(
        response_tokens=tokens,
        model_tokens=model_tokens,
        model_tokens_per_response_token=model_tokens / tokens,
        ln_ray_s=ln_s,
        ln_ray_global_s=scorer.seconds["global"],
        ln_ray_local_s=scorer.seconds["local"],
        ln_ray_response_tokens_per_s=tokens / ln_s,
        ln_ray_model_tokens_per_s=model_tokens / ln_s,
        body_parameters=params,
        matmul_gflops=gemm_flops / 1e9,
        scorer_model_gflops=2 * params * model_tokens / ln_s / 1e9,
    )

    if not args.skip_ifd:
        # scoring.ifd: the same traces once more, each response after the no-prompt context.
        # The other figures compare like with like without it (the baselines compute no IFD).
        scorer.unconditional = unconditional_context(student.tokenizer)
        ifd_s, with_ifd = timed(score_all, device)
        scorer.unconditional = None
        ifd_tokens = sum(r.model_tokens for r in with_ifd) - model_tokens
        figures["ifd_model_token_share"] = ifd_tokens / model_tokens
        figures["ifd_time_share"] = (ifd_s - ln_s) / ln_s
        details.update(ifd_s=ifd_s, ifd_model_tokens=ifd_tokens)
        print(f"with IFD        {ifd_s:8.1f} s (+{ifd_tokens} model tokens)", flush=True)

    if not args.skip_naive:
        naive_s, naive_out = timed(lambda: [naive.score(t) for t in corpus.traces], device)
        print(f"naive scorer    {naive_s:8.1f} s", flush=True)
        figures["speedup_vs_naive"] = naive_s / ln_s
        details.update(
            naive_s=naive_s,
            naive_response_tokens_per_s=tokens / naive_s,
            naive_model_tokens=naive.model_tokens,
            # The speedup if both ran their tokens equally fast: what sharing the prefix and
            # serving the first steps from the global pass save, before any kernel difference.
            naive_over_ln_ray_model_tokens=naive.model_tokens / model_tokens,
            # The same with the output head counted: the naive forward projects every position
            # (padding included), ln-ray only the scored ones.
            naive_over_ln_ray_flops=2 * (params + head_params) * naive.model_tokens / ln_flops,
            **_agreement(ours, naive_out),
        )

    if not args.skip_dense:
        dense_s, dense_tokens = timed(
            lambda: sum(
                dense_forward(
                    plain.model, plan, token_budget=args.token_budget, head_chunk=scorer.head_chunk
                )
                for plan in plans
            ),
            device,
        )
        assert dense_tokens == model_tokens, (dense_tokens, model_tokens)
        print(f"dense forward   {dense_s:8.1f} s", flush=True)
        figures["efficiency_vs_dense_forward"] = dense_s / ln_s
        details.update(dense_forward_s=dense_s, dense_model_tokens_per_s=model_tokens / dense_s)

    if not args.skip_job:
        job_s = _time_job(corpus, args)
        # The scorer again, right after the job: this machine's speed drifts over minutes, which
        # would otherwise move the figure more than the job's own costs do.
        beside_s, _ = timed(score_all, device)
        figures["job_overhead"] = (job_s - beside_s) / job_s
        details.update(job_s=job_s, ln_ray_beside_job_s=beside_s)
        print(f"ray job         {job_s:8.1f} s (scorer right after: {beside_s:.1f} s)", flush=True)

    if not args.skip_long:
        long = _long_trace(args.long_tokens, args)
        short = _long_trace(args.short_tokens, args)
        figures["peak_mem_32k_over_model_gb"] = long["peak_rss_gb"] - long["rss_before_gb"]
        figures["linearity_32k_over_1k"] = long["local_s"] / short["local_s"]
        details["long_trace"] = long
        details["short_trace"] = short

    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(device),
        "corpus": {
            "source": corpus.source,
            "traces": len(corpus.traces),
            "teachers": sorted({r["teacher"] for r in corpus.rows}),
        },
        "settings": {
            k: getattr(args, k)
            for k in ("window", "token_budget", "batch_traces", "naive_batch", "device")
        },
        "figures": figures,
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "details": details,
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    _print_table(figures, details)
    print(f"\nwrote {args.out}")


def timed(fn, device: torch.device) -> tuple[float, Any]:
    """Seconds ``fn`` takes on ``device`` (its queued work included), and what it returns."""
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - started, out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(corpus: Corpus, scorer, naive, model, args) -> None:
    """One small call of each, so one-time costs (allocators, kernels) fall outside the timings."""
    small = first_steps(corpus.traces[0], 6)
    scorer.score([small])
    naive.score(small)
    dense_forward(
        model, scorer.plan([small]), token_budget=args.token_budget, head_chunk=scorer.head_chunk
    )
    scorer.seconds = {"global": 0.0, "local": 0.0}


def _matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10
) -> float:
    """FLOP/s of a large square matmul in the student's dtype: the best this device does."""
    n = n if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def _body_parameters(model: torch.nn.Module) -> int:
    """Parameters every token's forward multiplies by: all but the embedding table and the head."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _agreement(ours, naive_out) -> dict[str, float]:
    """How far ln-ray's numbers are from the naive scorer's (the same definitions)."""
    diffs, same_rank, n = [0.0], 0, 0
    for fast, (g_lp, g_rank, l_lp) in zip(ours, naive_out, strict=True):
        diffs.append(float(np.abs(fast.global_logprobs - g_lp).max()))
        diffs.append(float(np.abs(fast.local_logprobs - l_lp).max()))
        same_rank += int((fast.global_ranks == g_rank).sum())
        n += len(g_rank)
    return {"max_abs_diff_vs_naive": max(diffs), "rank_agreement_vs_naive": same_rank / max(n, 1)}


def _time_job(corpus: Corpus, args) -> float:
    """The whole job (read, prepare, score, write, reduce) on the corpus, on local Ray."""
    import ray
    from ray.data import DataContext

    from ln_ray.pipeline.job import run_score

    work = Path(tempfile.mkdtemp(prefix="ln-ray-bench-"))
    pq.write_table(pa.Table.from_pylist(corpus.rows), work / "traces.parquet")
    cfg = load_config(
        "default",
        [
            f"input.path={work / 'traces.parquet'}",
            f"output.path={work / 'out'}",
            f"scoring.window={args.window}",
            f"compute.token_budget={args.token_budget}",
            f"compute.batch_traces={args.batch_traces}",
            f"compute.gpus_per_actor={1 if args.device.startswith('cuda') else 0}",
            "scoring.ifd=false",  # as the scorer it is compared with
        ],
    )
    # a running cluster, as in prod (its own, never one that `ray start` left on this node)
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    manifest = run_score(cfg)
    seconds = time.perf_counter() - started
    ray.shutdown()
    assert manifest.counts["rows_scored"] == len(corpus.rows), manifest.counts
    return seconds


def _long_trace(n_tokens: int, args) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.long_trace",
        f"--tokens={n_tokens}",
        f"--window={args.window}",
        f"--token-budget={args.token_budget}",
        f"--device={args.device}",
    ]
    if args.data:
        command.append(f"--data={args.data}")
    out = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(
        f"{n_tokens:>6}-token trace: local {result['local_s']:.1f} s, "
        f"global {result['global_s']:.1f} s, "
        f"peak +{result['peak_rss_gb'] - result['rss_before_gb']:.2f} GB",
        flush=True,
    )
    return result


def _machine(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _print_table(figures: dict[str, float], details: dict[str, Any]) -> None:
    print("\nfigure                            value   target   ok")
    for name, value in figures.items():
        op, target = TARGETS.get(name, ("", None))
        ok = "" if target is None else ("yes" if _meets(value, op, target) else "NO")
        shown = "" if target is None else f"{op} {target:g}"
        print(f"{name:<30} {value:8.3f}   {shown:<7}  {ok}")
    print(
        f"\nln-ray {details['ln_ray_response_tokens_per_s']:.0f} response tokens/s, "
        f"{details['ln_ray_model_tokens_per_s']:.0f} model tokens/s; matmul "
        f"{details['matmul_gflops']:.0f} GFLOP/s, scorer {details['scorer_model_gflops']:.0f}"
    )
    if "naive_s" in details:
        print(
            f"naive {details['naive_response_tokens_per_s']:.0f} response tokens/s, running "
            f"{details['naive_over_ln_ray_model_tokens']:.2f}x ln-ray's model tokens "
            f"({details['naive_over_ln_ray_flops']:.2f}x its FLOPs); "
            f"max |ln-ray - naive| log-prob {details['max_abs_diff_vs_naive']:.1e}, ranks equal "
            f"{details['rank_agreement_vs_naive']:.1%}"
        )
    if "dense_forward_s" in details:
        print(f"dense forward {details['dense_model_tokens_per_s']:.0f} model tokens/s")


def _meets(value: float, op: str, target: float) -> bool:
    return value >= target if op == ">=" else value <= target


if __name__ == "__main__":
    main()
