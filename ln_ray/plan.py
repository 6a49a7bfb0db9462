"""``ln-ray plan``: what a run over an input will cost, estimated from a sample before submitting.

It reads a uniform sample of rows from a few of the input files (spread over the listing),
prepares them exactly as the job does (the student's tokenizer, chat template and view; no model
weights), and counts, per trace, the tokens the scorer runs through the model: the chat prefix
once, the global sequence, every local window and (``scoring.ifd``) the response given no prompt
(``score.planning.plan_scoring``, the scorer's own plan). Rows in the whole input are
extrapolated from the sampled files' rows per byte. The compute follows from the student's size,
counted from its config without loading weights:

    FLOPs = 2 x body parameters x model tokens  +  2 x hidden x vocabulary x scored positions

(scored positions: the targets of every sequence the scorer runs: each response token once
globally, once more locally unless its window is a prefix of the global sequence, and once more
given no prompt with ``scoring.ifd``), and GPU-hours =
FLOPs / (peak FLOP/s x MFU). The MFU is an assumption to state, not a measurement: docs/SCALING.md
explains the defaults. From the wall-clock estimate follow the limits a RayJob needs for the run
(``rayjob_limits``): a deadline that the run, and a retry of it, fit in.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

from ln_ray.config import LnRayConfig, prepare_options
from ln_ray.io import storage
from ln_ray.io.shards import count_source_rows, iter_jsonl, iter_parquet
from ln_ray.prepare.render import unconditional_context
from ln_ray.prepare.rows import RowRejected, prepare_row
from ln_ray.score.planning import ScoringPlan, plan_scorable

# Bytes of a trace's score cache row in Arrow (ids, metrics, step log-probs and lengths): the demo
# run's cache held 22,828 bytes for 120 traces of 682 steps. Parquet on disk compresses that, and
# each bucket file adds a few KB of its own.
CACHE_BYTES_PER_TRACE = 120
CACHE_BYTES_PER_STEP = 12

# A RayJob's deadline: the estimate with a margin for its assumptions (the MFU above all), and
# for each attempt the cost of a start (nodes, the student's load, reading and the reduce). A
# retry resumes from the score cache, so it repeats no scoring, only a start.
DEADLINE_MARGIN = 1.5
START_HOURS = 1.0
RAYJOB_RETRIES = 1


def plan_run(
    cfg: LnRayConfig,
    *,
    sample_rows: int = 200,
    sample_files: int = 8,
    gpus: int = 8,
    gpu_tflops: float = 989.0,
    mfu: float = 0.3,
    new_fraction: float = 1.0,
) -> dict[str, Any]:
    """Estimate a run over ``cfg.input.path`` from a sample.

    Args:
        cfg: The run's config (student, view, window, global cap).
        sample_rows: Rows to prepare.
        sample_files: Input files to sample (spread over the sorted listing).
        gpus: GPUs the scoring actors get.
        gpu_tflops: Peak dense TFLOP/s of one GPU in the student's dtype (989: H100 bf16).
        mfu: The fraction of that peak the scorer reaches (an assumption).
        new_fraction: Share of the traces not yet in the score cache (a refresh: 0.05).

    Returns:
        The sample's statistics and the estimates.
    """
    from ln_ray.score.student import load_tokenizer

    inputs = storage.Inputs.list(cfg.input.path, cfg.input.format)
    fs, files = inputs.fs, inputs.files
    from_path = inputs.path_fields(cfg.input.teacher_from_path)
    sizes = {path: fs.size(path) for path, _ in files}
    step = max(1, len(files) // sample_files)
    sampled = files[::step][:sample_files]
    tokenizer = load_tokenizer(cfg.student)
    per_file = max(1, math.ceil(sample_rows / len(sampled)))
    traces, rejected, rows_seen, bytes_seen = [], 0, 0, 0
    for path, fmt in sampled:
        url = storage.full_url(fs, path)
        counted = count_source_rows(url, fmt).get("rows_in_file") or 0
        rows_seen += counted
        bytes_seen += sizes[path]
        for raw in _rows(fs, path, fmt, cfg, per_file, from_path.get(path)):
            try:
                traces.append(prepare_row(raw, tokenizer, **prepare_options(cfg)).tokens)
            except RowRejected:
                rejected += 1
    if not traces:
        raise ValueError("no row of the sample could be prepared: nothing to estimate from")
    planned = _scoring_plan(traces, cfg, tokenizer)
    prefix = np.array([t.prefix_len for t in traces])
    response = np.array([t.n_response for t in traces])
    steps = np.array([t.n_steps for t in traces])
    model = np.array(planned.model_tokens)  # the traces whose prompt fits the global cap
    if not len(model):
        raise ValueError("no sampled trace's prompt fits the student's global cap")
    sequences = [*planned.global_sequences, *planned.window_sequences]
    positions = sum(len(s.targets) for s in sequences + planned.unconditional_sequences)
    ifd_tokens = sum(len(s.tokens) for s in planned.unconditional_sequences)
    total_bytes = sum(sizes.values())
    rows = total_bytes * rows_seen / bytes_seen if bytes_seen else 0.0
    accepted = rows * len(traces) / (len(traces) + rejected)
    new = accepted * new_fraction
    body, head = student_parameters(cfg)
    flops = new * (2 * body * model.mean() + 2 * head * positions / len(model))
    gpu_hours = flops / (gpu_tflops * 1e12 * mfu) / 3600
    return {
        "input": storage.redact_url(cfg.input.path),
        "files": len(files),
        "input_bytes": total_bytes,
        "sample": {"files": len(sampled), "rows": len(traces) + rejected, "rejected": rejected},
        "per_trace": {
            "prefix_tokens": float(prefix.mean()),
            "response_tokens": float(response.mean()),
            "response_tokens_p95": float(np.percentile(response, 95)),
            "steps": float(steps.mean()),
            "model_tokens": float(model.mean()),
            "ifd_tokens": ifd_tokens / len(model),  # of model_tokens: scoring.ifd's cost
            "scored_positions": positions / len(model),
        },
        "rows": round(rows),
        "traces_to_score": round(new),
        "student": {"body_parameters": body, "head_parameters": head},
        "model_tokens": float(new * model.mean()),
        "flops": float(flops),
        "assumptions": {"gpus": gpus, "gpu_tflops": gpu_tflops, "mfu": mfu},
        "gpu_hours": gpu_hours,
        "wall_hours": gpu_hours / gpus,
        "rayjob": rayjob_limits(gpu_hours / gpus),
        "cache_bytes": accepted * (CACHE_BYTES_PER_TRACE + CACHE_BYTES_PER_STEP * steps.mean()),
        "text_bytes": total_bytes,
    }


def rayjob_limits(wall_hours: float, retries: int = RAYJOB_RETRIES) -> dict[str, int]:
    """A RayJob's ``activeDeadlineSeconds`` and ``backoffLimit`` for a run whose scoring the
    plan estimates at ``wall_hours``: the estimate times ``DEADLINE_MARGIN``, plus
    ``START_HOURS`` for each attempt (the first and ``retries`` more), in whole hours."""
    hours = math.ceil(wall_hours * DEADLINE_MARGIN + START_HOURS * (1 + retries))
    return {"active_deadline_s": hours * 3600, "backoff_limit": retries}


def _scoring_plan(traces: list[Any], cfg: LnRayConfig, tokenizer: Any) -> ScoringPlan:
    """The sequences the scorer would run for ``traces`` (its own ``plan_scoring``), with the
    student's global cap and RoPE limit; a student the job would refuse is refused here too."""
    from ln_ray.score.student import load_model_config
    from ln_ray.score.vetting import check_scorable, global_cap

    config = load_model_config(cfg.student)
    cap = global_cap(config, cfg.scoring.max_tokens)
    rope_limit = check_scorable(config, cap)
    unconditional = None
    if cfg.scoring.ifd:
        unconditional = unconditional_context(tokenizer, cfg.student.template_kwargs)
    return plan_scorable(
        traces, cfg.scoring, max_tokens=cap, rope_limit=rope_limit, unconditional=unconditional
    )


def student_parameters(cfg: LnRayConfig) -> tuple[int, int]:
    """The student's body parameters (all but the embedding table and the output head) and its
    output head's (hidden x vocabulary), from its config alone (no weights are loaded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ln_ray.score.student import load_model_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_model_config(cfg.student))
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    embeddings |= {id(p) for p in model.get_output_embeddings().parameters()}
    body = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    head = model.get_output_embeddings().weight.numel()
    return int(body), int(head)


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as an operator reads it."""
    t, a = plan["per_trace"], plan["assumptions"]
    return "\n".join(
        [
            f"ln-ray plan for {plan['input']}: {plan['files']} files, {_size(plan['input_bytes'])}",
            f"  sample: {plan['sample']['rows']} rows from {plan['sample']['files']} files "
            f"({plan['sample']['rejected']} rejected)",
            f"  per trace: {t['response_tokens']:.0f} response tokens (p95 "
            f"{t['response_tokens_p95']:.0f}), {t['prefix_tokens']:.0f} prefix tokens, "
            f"{t['steps']:.0f} steps, {t['model_tokens']:.0f} model tokens"
            + (f" ({t['ifd_tokens']:.0f} of them for IFD)" if t["ifd_tokens"] else ""),
            f"  rows (estimated): {plan['rows']:,}; traces to score: {plan['traces_to_score']:,}",
            f"  student: {plan['student']['body_parameters'] / 1e9:.3f} B body parameters",
            f"  model tokens: {plan['model_tokens']:,.0f}; compute: {plan['flops']:.3g} FLOP",
            f"  at MFU {a['mfu']:.2f} of {a['gpu_tflops']:.0f} TFLOP/s: "
            f"{plan['gpu_hours']:.3g} GPU-hours, {plan['wall_hours']:.3g} h on {a['gpus']} GPUs",
            f"  storage: input text {_size(plan['text_bytes'])} (kept once, _valid/), "
            f"score cache {_size(plan['cache_bytes'])}",
            f"  RayJob (infra/k8s/rayjob.yaml) for {a['gpus']} GPUs: activeDeadlineSeconds: "
            f"{plan['rayjob']['active_deadline_s']}, backoffLimit: "
            f"{plan['rayjob']['backoff_limit']}",
        ]
    )


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _rows(
    fs: Any, path: str, fmt: str, cfg: LnRayConfig, limit: int, from_path: Any
) -> list[dict[str, Any]]:
    """A uniform sample of ``limit`` readable rows of one file (reservoir sampling, seeded)."""
    rng = random.Random(0)
    kept: list[dict[str, Any]] = []
    with fs.open(path, "rb") as handle:
        reader = iter_parquet if fmt == "parquet" else iter_jsonl
        rows = reader(handle, cfg.input.columns, from_path=from_path, layout=cfg.input.layout)
        readable = (row for row in rows if not row.get("read_error"))
        for seen, row in enumerate(readable):
            if seen < limit:
                kept.append(row)
            elif (slot := rng.randrange(seen + 1)) < limit:
                kept[slot] = row
    return kept
