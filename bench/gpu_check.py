"""The GPU proof: ln-ray's GPU path tested and measured in one run, for a GPU lent for minutes.

    bash scripts/gpu_check.sh                              # on the GPU machine (make gpu-check)
    python -m bench.gpu_check --device cpu --quick         # the CPU dry run (make test, slow tier)

In order, each part's results written to the JSON file as soon as it ends (a run stopped at its
time limit still leaves what it measured):

1. ``tests``: ``tests/equivalence/`` on the device (``test_gpu.py`` runs there: fp32 against the
   CPU reference, bf16 bounds, varlen packs against per-sequence attention, sliding windows, the
   host's waits); the outcome counts and any failure's name.
2. ``self_check``: the actors' self-check (``score/proof.py``) on each shape in bf16: its largest
   and mean log-prob difference against its tolerance. A difference past it would stop every run.
3. ``throughput``: students with the shapes of Qwen2.5-1.5B and Llama-3.1-8B (random weights in
   bf16, built on the device from their configs: no download), scoring traces of 4k and 16k
   response tokens at the default window: model tokens/s, MFU, a dense forward of the same tokens
   (``efficiency_vs_dense_forward``, as ``make bench`` reports on a CPU) and the naive per-window
   scorer (``speedup_vs_naive``, 4k traces only). MFU counts what ``ln-ray plan`` counts,
   ``2 x body parameters x model tokens + 2 x head parameters x scored positions``, over the
   device's peak (``--peak-tflops``: 989, the H200's dense bf16 by its datasheet); ``mfu_measured``
   is over the best square bf16 matmul measured in the same run, and ``attention_flops`` adds the
   attention's own products (query-key and value, as run: the windows' prefix and causal part).
4. ``agreement``: bf16 against fp32 on the same traces (the first shape, 4k traces): token-rank
   agreement (bf16 logits tie), the largest and mean log-prob differences, and per-trace metric
   differences with their Spearman rank correlation across traces.

Random weights give near-uniform distributions; the final norm's weight is scaled so that logits
spread as a trained model's do (standard deviation about 3), which makes ranks and metrics
differ between tokens and traces as they do in use. Throughput does not depend on it.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.baselines import NaiveScorer, dense_forward
from bench.run import timed
from bench.tiny import TINY_SHAPE
from ln_ray.config import ComputeConfig, ScoringConfig
from ln_ray.prepare.render import TokenizedTrace
from ln_ray.score import attention
from ln_ray.score.attention import plain_forward
from ln_ray.score.proof import TOLERANCES, ProofError, prove_student
from ln_ray.score.scorer import ScoringPlan, StudentScorer

REPO = Path(__file__).resolve().parents[1]

# The shapes of two common students, from their published configs (no weights: random init).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # The dry run's student: the tests' tiny shape.
    "tiny": dict(model_type="llama", vocab_size=512, **TINY_SHAPE),
}
# What the GPU path is held to: (shape, trace length, figure): (comparison, target).
TARGETS = {
    ("llama-3.1-8b", 16384, "mfu"): (">=", 0.5),
    ("llama-3.1-8b", 16384, "efficiency_vs_dense_forward"): (">=", 0.85),
}
LOGIT_STD = 3.0  # the spread of a trained model's logits, given to random weights
PROMPT_TOKENS = 256
STEP_TOKENS = (16, 96)  # a step's length, uniform in this range (a reasoning paragraph)


@dataclass(frozen=True)
class Sizes:
    """What the run measures: shapes, trace lengths and how many traces of each."""

    shapes: tuple[str, ...]
    lengths: tuple[int, ...]
    traces: dict[int, int]  # response tokens -> traces scored at that length
    naive_up_to: int  # the naive scorer runs on traces this long or shorter
    agreement_traces: int


FULL = Sizes(
    shapes=("qwen2.5-1.5b", "llama-3.1-8b"),
    lengths=(4096, 16384),
    traces={4096: 16, 16384: 4},
    naive_up_to=4096,
    agreement_traces=16,
)
QUICK = Sizes(
    shapes=("tiny",),
    lengths=(256, 1024),
    traces={256: 4, 1024: 2},
    naive_up_to=256,
    agreement_traces=6,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and traces (dry run)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak")
    parser.add_argument("--window", type=int, default=ScoringConfig.window)
    parser.add_argument("--token-budget", type=int, default=ComputeConfig.token_budget)
    parser.add_argument("--out", default=str(REPO / "bench" / "gpu.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: --device cpu --quick is the dry run")
    sizes = QUICK if args.quick else FULL
    dtype = torch.bfloat16
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(device),
        "targets": {"/".join(map(str, k)): f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "settings": {
            "window": args.window,
            "token_budget": args.token_budget,
            "dtype": str(dtype).removeprefix("torch."),
            "prompt_tokens": PROMPT_TOKENS,
            "step_tokens": list(STEP_TOKENS),
            "logit_std": LOGIT_STD,
            "peak_tflops": args.peak_tflops,
            "sizes": {**sizes.__dict__, "traces": {str(k): v for k, v in sizes.traces.items()}},
        },
    }
    out = Path(args.out)
    started = time.perf_counter()

    def save(part: str, value: Any) -> None:
        """``value`` at ``part`` (a ``/`` path) in the results, written out at once."""
        *parents, name = part.split("/")
        node = results
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = value
        results["seconds"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(results, indent=1, default=_plain) + "\n")
        print(f"[{results['seconds']:7.1f} s] {part}: {json.dumps(value, default=_plain)}")
        sys.stdout.flush()

    if not args.skip_tests:
        save("tests", run_equivalence_tests(out.with_name(out.stem + "_tests.xml")))
    matmul = matmul_tflops(device, dtype)
    save("matmul_tflops", matmul)
    for shape in sizes.shapes:
        model = build_student(shape, device, dtype)
        scorer = StudentScorer(model, window=args.window, token_budget=args.token_budget)
        save(f"self_check/{shape}", self_check(scorer, shape))
        for length in sizes.lengths:
            traces = make_traces(sizes.traces[length], length, model.config.vocab_size, seed=length)
            figures = throughput(
                scorer, traces, args, naive=length <= sizes.naive_up_to, matmul=matmul
            )
            save(f"throughput/{shape}/{length}", figures)
        del scorer, model
        _free(device)
    shape, length = sizes.shapes[0], sizes.lengths[0]
    traces = make_traces(sizes.agreement_traces, length, SHAPES[shape]["vocab_size"], seed=7)
    save(f"agreement/{shape}/{length}", agreement(shape, traces, args, device))
    save("problems", problems(results))
    print(f"wrote {out}")
    return results


def problems(results: dict[str, Any]) -> list[str]:
    """What failed or missed its target, one line each (none: the GPU path holds)."""
    found = []
    tests = results.get("tests")
    if tests is not None and tests["exit_code"] != 0:
        found.append(f"tests: exit code {tests['exit_code']}, failed {tests['failures']}")
    for shape, check in results.get("self_check", {}).items():
        if not check["passed"]:
            found.append(f"self-check of {shape}: {check['error']}")
    for (shape, length, figure), (op, target) in TARGETS.items():
        value = results.get("throughput", {}).get(shape, {}).get(str(length), {}).get(figure)
        if value is not None and not (value >= target if op == ">=" else value <= target):
            found.append(
                f"{figure} on {shape} at {length} tokens: {value:.3f}, target {op} {target}"
            )
    return found


def run_equivalence_tests(report: Path) -> dict[str, Any]:
    """``tests/equivalence/`` (not its slow tier: that loads SmolLM2) in a child pytest."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests/equivalence",
        "-m",
        "not slow",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    print(done.stdout[-6000:], done.stderr[-2000:], sep="\n")
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures, gpu_ran = [], []
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed" if case.find("failure") is not None else "errors"] += 1
                failures.append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
                if "test_gpu" in name:
                    gpu_ran.append(case.get("name"))
    return {
        "exit_code": done.returncode,
        **counts,
        "failures": failures,
        "gpu_tests_passed": gpu_ran,
        "seconds": round(time.perf_counter() - started, 1),
    }


def build_student(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight student of ``shape``, built on ``device`` in ``dtype``; its final norm
    scaled so that its logits spread by about ``LOGIT_STD``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(SHAPES[shape])
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    with torch.device(device):
        # SDPA: the plain forward the baselines and the self-check's reference run
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    with torch.no_grad():
        probe = torch.randint(0, config.vocab_size, (1, 64), device=device)
        logits = model(probe).logits.float()
        model.get_decoder().norm.weight.mul_(LOGIT_STD / float(logits.std()))
    return model


def make_traces(count: int, response_tokens: int, vocab: int, seed: int) -> list[TokenizedTrace]:
    """Random token ids: a ``PROMPT_TOKENS`` prompt, then ``response_tokens`` in steps."""
    rng = np.random.default_rng(seed)
    traces = []
    for _ in range(count):
        lengths = []
        while sum(lengths) < response_tokens:
            lengths.append(int(rng.integers(STEP_TOKENS[0], STEP_TOKENS[1] + 1)))
        lengths[-1] -= sum(lengths) - response_tokens
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = rng.integers(0, vocab, PROMPT_TOKENS + response_tokens, dtype=np.int64)
        traces.append(TokenizedTrace(input_ids=ids, prefix_len=PROMPT_TOKENS, step_bounds=bounds))
    return traces


def self_check(scorer: StudentScorer, shape: str) -> dict[str, Any]:
    """The actors' self-check on this student: its differences, or the error it would stop on."""
    dtype = next(scorer.model.parameters()).dtype
    tolerance = TOLERANCES[dtype]
    started = time.perf_counter()
    try:
        proof = prove_student(scorer, shape)
    except ProofError as exc:
        return {"passed": False, "error": str(exc), "tolerance": tolerance.__dict__}
    return {
        "passed": True,
        "largest": proof.max_difference,
        "mean": proof.mean_difference,
        "tolerance": tolerance.__dict__,
        "probe_tokens": proof.probe_tokens,
        "seconds": round(time.perf_counter() - started, 2),
    }


def throughput(
    scorer: StudentScorer,
    traces: list[TokenizedTrace],
    args: argparse.Namespace,
    *,
    naive: bool,
    matmul: float,
) -> dict[str, Any]:
    """The scorer's speed on ``traces`` against a dense forward and (``naive``) the naive scorer."""
    model, device = scorer.model, scorer.device
    batch = ComputeConfig.batch_traces
    batches = [traces[a : a + batch] for a in range(0, len(traces), batch)]
    warm = [_first_steps(traces[0], 8)]
    scorer.score(warm)  # kernels chosen and memory taken outside the timings
    seconds, scored = timed(lambda: [s for b in batches for s in scorer.score(b)], device)
    plans = [scorer.plan(b) for b in batches]
    model_tokens = sum(s.model_tokens for s in scored)
    positions = sum(len(q.targets) for p in plans for q in _sequences(p))
    body, head = _parameters(model)
    plan_flops = 2 * body * model_tokens + 2 * head * positions
    attention = sum(_attention_flops(model.config, p) for p in plans)
    peak = args.peak_tflops * 1e12
    figures: dict[str, Any] = {
        "traces": len(traces),
        "response_tokens": sum(t.n_response for t in traces),
        "model_tokens": model_tokens,
        "scorer_s": seconds,
        "model_tokens_per_s": model_tokens / seconds,
        "mfu": plan_flops / seconds / peak,
        "mfu_measured": plan_flops / seconds / (matmul * 1e12),
        "mfu_with_attention": (plan_flops + attention) / seconds / peak,
        "attention_flops_share": attention / (plan_flops + attention),
        "peak_memory_gb": _peak_memory_gb(device),
    }
    with plain_forward(model):
        dense_forward(model, scorer.plan(warm), token_budget=args.token_budget, head_chunk=2048)
        dense_s, dense_tokens = timed(
            lambda: sum(
                dense_forward(
                    model, p, token_budget=args.token_budget, head_chunk=scorer.head_chunk
                )
                for p in plans
            ),
            device,
        )
        assert dense_tokens == model_tokens, (dense_tokens, model_tokens)
        figures.update(dense_s=dense_s, efficiency_vs_dense_forward=dense_s / seconds)
        if naive:
            baseline = NaiveScorer(model, window=args.window, batch_size=8, pad_id=0)
            baseline.score(warm[0])
            naive_s, _ = timed(lambda: [baseline.score(t) for t in traces], device)
            figures.update(naive_s=naive_s, speedup_vs_naive=naive_s / seconds)
    return figures


# A stand-in for a template's no-prompt context on the random-token traces (IFD's context).
NO_PROMPT = np.arange(1, 9, dtype=np.int64)


def agreement(
    shape: str, traces: list[TokenizedTrace], args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """bf16 against fp32 on the same traces: the same weights, rounded to bf16."""
    results = {}
    model = build_student(shape, device, torch.float32)
    for dtype in (torch.bfloat16, torch.float32):  # fp32 last: its copy is the one built
        student = copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model
        scorer = StudentScorer(
            student,
            window=args.window,
            token_budget=args.token_budget,
            unconditional=NO_PROMPT,  # IFD too
        )
        results[dtype] = scorer.score(traces)
        del scorer, student
        _free(device)
    del model
    _free(device)
    bf16, exact = results[torch.bfloat16], results[torch.float32]
    ranks_a = np.concatenate([s.global_ranks for s in bf16])
    ranks_b = np.concatenate([s.global_ranks for s in exact])
    found: dict[str, Any] = {
        "tokens": len(ranks_a),
        "rank_equal": float(np.mean(ranks_a == ranks_b)),
        "rank_within_1": float(np.mean(np.abs(ranks_a - ranks_b) <= 1)),
        "top1_equal": float(np.mean((ranks_a == 1) == (ranks_b == 1))),
    }
    for field in ("global_logprobs", "local_logprobs"):
        diff = np.abs(
            np.concatenate([getattr(s, field) for s in bf16]).astype(np.float64)
            - np.concatenate([getattr(s, field) for s in exact])
        )
        found[field] = {"largest": float(diff.max()), "mean": float(diff.mean())}
    for metric in ("lalp", "lalp_drop1", "galp", "rsr", "ifd", "ifd_ppl"):
        a = np.array([getattr(s, metric) for s in bf16])
        b = np.array([getattr(s, metric) for s in exact])
        found[metric] = {
            "largest_difference": float(np.abs(a - b).max()),
            "spread_across_traces": float(b.std()),
            "spearman": _spearman(a, b),
        }
    return found


def matmul_tflops(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """The best square matmul in ``dtype`` on ``device``, TFLOP/s: the ceiling measured here."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        seconds, _ = timed(lambda: a @ b, device)
        best = min(best, seconds)
    return 2 * n**3 / best / 1e12


def _attention_flops(config: Any, plan: ScoringPlan) -> float:
    """Query-key and value products of the plan's sequences, as run: each query against the
    recorded prefix it uses (when it does) and the causal part of its own sequence."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_pair = 4 * config.num_hidden_layers * heads * head_dim  # 2 products, 2 FLOPs each
    pairs = 0
    prefixes = {
        q.trace: q.records_prefix_len for q in plan.global_sequences if q.records_prefix_len
    }
    for seq in _sequences(plan):
        n = len(seq.tokens)
        prefix = prefixes.get(seq.trace, 0) if seq.uses_prefix else 0
        pairs += n * prefix + n * (n + 1) // 2
    return float(per_pair * pairs)


def _sequences(plan: ScoringPlan) -> list[Any]:
    return [*plan.global_sequences, *plan.window_sequences]


def _parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Body parameters (every token multiplies by them) and the head's."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    skip = {id(embed), id(head)}
    body = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    return body, head.numel()


def _first_steps(trace: TokenizedTrace, steps: int) -> TokenizedTrace:
    bounds = trace.step_bounds[: steps + 1]
    return TokenizedTrace(
        input_ids=trace.input_ids[: trace.prefix_len + int(bounds[-1])],
        prefix_len=trace.prefix_len,
        step_bounds=bounds,
    )


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return float("nan")
    ranks = [np.argsort(np.argsort(x)).astype(np.float64) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def _peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 2)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _machine(device: torch.device) -> dict[str, Any]:
    import transformers

    found = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
        found["cuda"] = torch.version.cuda
    # Without it (an older torch), bf16 packs run one SDPA call per segment instead.
    found["varlen_kernel"] = attention._torch_varlen() is not None
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value))


if __name__ == "__main__":
    found = main()["problems"]
    print("\n".join(["gpu_check: problems:", *found]) if found else "gpu_check: no problem found")
    sys.exit(1 if found else 0)
