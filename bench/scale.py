"""`make bench-scale`: a scale rehearsal of the job's data flow on this machine.

Corpus: ``--rows`` rows (a quarter as many prompts, 4 teachers each), responses of about
``--response-chars`` characters (500 by default) in three paragraphs and a 10 KB extra text column
(rows of production size without tokenizer cost), 1% duplicate rows and 0.5% bad rows, written
once as ``--shards`` JSONL shards and once as ``--few-shards``, row by row (the corpus is never
held in memory). Student: a tiny random Llama with a tiny BPE tokenizer (``bench/tiny.py``), so
the figures measure the data flow, not the model.

Runs, each in a fresh process with its own local Ray (``object_store_memory`` 2 GB): the first
run; a refresh after adding 5% new rows; a re-run with nothing new; the first run at a quarter of
the rows (growth); the first run on the few-shard copy (per-shard overhead). Then ``ln-ray
report`` and ``ln-ray summary`` on the refreshed run, each in a process of its own (their peak
memory), and two small runs write to moto's S3 server on loopback, which counts the bytes it
copies (publishing should copy none). Prints the figures side by side against their targets and
writes them into ``bench/scale.json``, under the number of rows (other sizes' figures stay).

    python -m bench.scale                                   # what `make bench-scale` runs
    python -m bench.scale --rows 1000000 --response-chars 150   # `make bench-scale-1m`
    python -m bench.scale --rows 8000 --shards 80 --few-shards 8 --out /tmp/scale.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.json as pajson
import pyarrow.parquet as pq

from bench.moto import moto_s3_server
from bench.tiny import SENTENCES, make_tiny_causal_lm, train_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
PLAIN_SENTENCES = [
    " ".join(s.replace("<think>", "").replace("</think>", "").split()) for s in SENTENCES
]
TEACHERS = ("alpha", "beta", "gamma", "delta")
STAGES = ("read_validate", "lookup_cache", "tokenize_score", "assemble", "reduce")
TARGETS = {  # figure: (comparison, target)
    "refresh_tokenized_fraction": ("<=", 0.06),
    "refresh_scored_fraction": ("<=", 0.06),
    "rerun_over_floor": ("<=", 3.0),
    "driver_peak_rss_mb": ("<=", 1000.0),
    "driver_rss_growth": ("<=", 1.25),  # 4x the rows
    "report_peak_rss_mb": ("<=", 1000.0),
    "summary_peak_rss_mb": ("<=", 1000.0),
    "spilled_bytes": ("<=", 0),
    "cache_files_over_buckets": ("<=", 10),
    "publish_copied_bytes": ("<=", 0),
    "max_growth_full_over_quarter": ("<=", 4.4),  # 4x the rows: at most 1.1x linear
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--few-shards", type=int, default=50)
    parser.add_argument("--response-chars", type=int, default=450)
    parser.add_argument("--buckets", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "bench" / "scale.json"))
    parser.add_argument("--work", help="working folder (default: a temporary one, removed)")
    parser.add_argument("--one-run", help=argparse.SUPPRESS)  # internal: a job in this process
    args = parser.parse_args()
    if args.one_run:
        print(json.dumps(_one_run(json.loads(args.one_run))))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="ln-ray-scale-"))
    try:
        results = rehearse(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    recorded = json.loads(out.read_text()) if out.exists() else {}
    if "rows" in recorded:  # one size's figures, as the file held them before
        recorded = {str(recorded["rows"]): recorded}
    recorded[str(args.rows)] = results
    out.write_text(json.dumps(recorded, indent=2) + "\n")
    _print(results)


def rehearse(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every run of the rehearsal, and the figures derived from them."""
    student = _tiny_student(work / "student")
    n, chars = args.rows, args.response_chars
    many, few, small = work / "many", work / "few", work / "quarter"
    print("[bench-scale] writing the corpus ...", flush=True)
    write_shards(many, make_rows(n, 0, chars), n, args.shards)
    new_rows = n // 20  # the refresh's 5% new rows
    both = itertools.chain(make_rows(n, 0, chars), make_rows(new_rows, 1, chars, offset=n))
    write_shards(few, both, n + new_rows, args.few_shards)
    write_shards(small, make_rows(n // 4, 0, chars), n // 4, max(1, args.shards // 4))
    settings = [
        f"output.cache_buckets={args.buckets}",
        "segment.mode=paragraph",  # three steps a row
        # Rows of ~150 tokens: a batch of 256 holds as many tokens as a few production traces.
        "compute.batch_traces=256",
        "compute.torch_threads=1",  # the other core tokenizes
    ]

    def job(name: str, folder: Path, out: str) -> dict[str, Any]:
        print(f"[bench-scale] {name} ...", flush=True)
        return _run_in_process(folder, work / out, student, settings)

    runs = {"first": job("first run", many, "out")}
    extra = make_rows(new_rows, 1, chars, offset=n)
    write_shards(many, extra, new_rows, max(1, args.shards // 20), prefix="new")
    runs["refresh"] = job("refresh with 5% new rows", many, "out")
    runs["rerun"] = job("re-run with nothing new", many, "out")
    cache_files = _cache_files(work / "out")
    # The same rows in few shards, all cached: the difference from "rerun" is per-shard cost.
    runs["rerun_few_shards"] = job("re-run on few shards", few, "out")
    runs["quarter"] = job("first run at a quarter of the rows", small, "out-quarter")
    print("[bench-scale] ln-ray report and ln-ray summary ...", flush=True)
    readers = {command: _command_peak_rss_mb(command, work / "out") for command in READERS}
    floor = measure_floor(many, work / "floor")
    print("[bench-scale] two runs onto the moto S3 server ...", flush=True)
    copied = measure_s3_copies(small, student, settings)
    return figures(runs, floor, cache_files, copied, readers, args)


def make_rows(
    n: int, seed: int, response_chars: int = 450, offset: int = 0
) -> Iterator[dict[str, Any]]:
    """``n`` rows, one at a time: 4 teachers a prompt, responses of about ``response_chars``
    characters in three paragraphs, a 10 KB extra column, 1% exact duplicates (a row repeating
    the one before it) and 0.5% bad rows (an empty response). The same ``n`` and ``seed`` give
    the same rows, and fewer rows are a prefix of more."""
    rng = random.Random(seed)
    pool = "".join(rng.choices("abcdefghij ", k=1 << 20))  # extra text is cut from this
    shortest = max(20, int(response_chars * 0.31))
    previous = None
    for i in range(n):
        number = offset + i
        paragraphs = []
        while sum(map(len, paragraphs)) < response_chars:  # three paragraphs: the steps
            paragraph = ""
            while len(paragraph) < shortest:
                paragraph += rng.choice(PLAIN_SENTENCES) + " "
            paragraphs.append(paragraph.strip())
        response = "\n\n".join(paragraphs)
        row = {
            "prompt_id": f"p{number // 4}",
            "prompt": f"Puzzle {number // 4}: what is the total?",
            "teacher": TEACHERS[number % 4],
            "response": response if rng.random() >= 0.005 else "",
            "context": pool[(start := rng.randrange(len(pool) - 10_000)) : start + 10_000],
        }
        if previous is not None and rng.random() < 0.01:
            row = dict(previous)  # a duplicate of its neighbour
        previous = row
        yield row


def write_shards(
    folder: Path, rows: Iterable[dict[str, Any]], n: int, shards: int, prefix: str = "part"
) -> None:
    """``n`` rows as ``shards`` JSONL files of equal size, written as they come."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-n // shards)
    rows = iter(rows)
    for index in range(shards):
        part = list(itertools.islice(rows, per))
        if not part:
            break
        with open(folder / f"{prefix}-{index:05d}.jsonl", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in part)


def measure_floor(folder: Path, target: Path) -> float:
    """Seconds pyarrow takes to read the input files and write the same rows once as Parquet."""
    target.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for path in sorted(folder.glob("*.jsonl")):
        pq.write_table(pajson.read_json(path), target / f"{path.stem}.parquet")
    return time.perf_counter() - started


def measure_s3_copies(folder: Path, student: str, settings: list[str]) -> int:
    """Bytes the moto S3 server copied (CopyObject, UploadPartCopy) while two runs over the
    first shards of ``folder`` wrote to it and published, the second over the first's results:
    publishing should copy nothing."""
    import boto3
    from moto.s3.models import S3Backend

    copied = [0]
    copy_object, upload_part_copy = S3Backend.copy_object, S3Backend.upload_part_copy

    def counted_copy(self, src_key, *args, **kwargs):
        copied[0] += src_key.size
        return copy_object(self, src_key, *args, **kwargs)

    def counted_part_copy(self, *args, **kwargs):
        part = upload_part_copy(self, *args, **kwargs)
        copied[0] += part.size
        return part

    S3Backend.copy_object, S3Backend.upload_part_copy = counted_copy, counted_part_copy
    try:
        with moto_s3_server() as endpoint:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            shards = folder.parent / "s3-input"
            shards.mkdir(exist_ok=True)
            for path in sorted(folder.glob("*.jsonl"))[:5]:
                shutil.copy(path, shards / path.name)
            for _ in range(2):
                _run_in_process(shards, "s3://bench/out", student, settings)
    finally:
        S3Backend.copy_object, S3Backend.upload_part_copy = copy_object, upload_part_copy
    return copied[0]


def figures(
    runs: dict,
    floor: float,
    cache_files: int,
    copied: int,
    readers: dict[str, float],
    args: argparse.Namespace,
) -> dict:
    first, refresh, rerun, quarter = (runs[k] for k in ("first", "refresh", "rerun", "quarter"))
    refresh_rows = refresh["manifest"]["stages"]["read_validate"]["rows"]
    tokenized = refresh["manifest"]["stages"]["tokenize_score"]["rows"]
    growth = {
        stage: _ratio(
            first["manifest"]["stages"][stage]["seconds"],
            quarter["manifest"]["stages"][stage]["seconds"],
        )
        for stage in STAGES
    }
    shards_apart = _shards(runs["rerun"]) - _shards(runs["rerun_few_shards"])
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "rows": args.rows,
        "shards": args.shards,
        "response_chars": args.response_chars,
        # job_s: run_score alone; wall_s: its process too (Python, Ray's start and stop)
        "job_s": {name: run["job_s"] for name, run in runs.items()},
        "wall_s": {name: run["wall_s"] for name, run in runs.items()},
        "rows_per_s": {
            name: {
                stage: _ratio(
                    run["manifest"]["stages"][stage].get(
                        "rows", run["manifest"]["counts"]["rows_read"]
                    ),
                    run["manifest"]["stages"][stage]["seconds"],
                )
                for stage in STAGES
            }
            for name, run in runs.items()
        },
        "refresh_tokenized_fraction": _ratio(tokenized, refresh_rows),
        # the rows handed to the scoring actors are the tokenized rows (a template's rejects
        # pass through them to be counted)
        "refresh_scored_fraction": _ratio(tokenized, refresh_rows),
        "floor_s": round(floor, 2),
        "rerun_over_floor": _ratio(rerun["job_s"], floor),
        "driver_peak_rss_mb": first["peak_rss_mb"],
        "driver_peak_rss_mb_quarter": quarter["peak_rss_mb"],
        "driver_rss_growth": _ratio(first["peak_rss_mb"], quarter["peak_rss_mb"]),
        "report_peak_rss_mb": readers["report"],
        "summary_peak_rss_mb": readers["summary"],
        "spilled_bytes": sum(run["spilled_bytes"] for run in runs.values()),
        "cache_files": cache_files,
        "cache_files_over_buckets": cache_files - args.buckets,
        "publish_copied_bytes": copied,
        "growth_full_over_quarter": growth,
        "max_growth_full_over_quarter": max((g for g in growth.values() if g), default=None),
        "rows_per_shard_overhead_ms": round(
            1000 * (rerun["job_s"] - runs["rerun_few_shards"]["job_s"]) / shards_apart, 2
        )
        if shards_apart
        else None,
    }
    result["targets"] = {
        name: {"target": f"{op} {value}", "met": _meets(result.get(name), op, value)}
        for name, (op, value) in TARGETS.items()
    }
    return result


def _run_in_process(folder: Path, out: Path | str, student: str, settings: list[str]) -> dict:
    spec = {"input": str(folder), "output": str(out), "student": student, "settings": settings}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--one-run", json.dumps(spec)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"the run failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - started, 2)
    return result


READERS = ("report", "summary")


def _command_peak_rss_mb(command: str, out: Path) -> float:
    """Peak resident memory of ``ln-ray COMMAND OUT`` in a process of its own."""
    code = (
        "import sys; from ln_ray.cli import main; code = main(sys.argv[1:]); "
        "from bench.scale import _peak_rss_mb; print(_peak_rss_mb()); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, command, str(out)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"ln-ray {command} failed:\n{done.stderr[-4000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _one_run(spec: dict[str, Any]) -> dict[str, Any]:
    import ray
    from ray.data import DataContext

    from ln_ray.config import load_config
    from ln_ray.pipeline.job import run_score

    cfg = load_config(
        "default",
        [
            f"input.path={spec['input']}",
            f"output.path={spec['output']}",
            f"student.model={spec['student']}",
            "selection.bootstrap_samples=200",
            *spec["settings"],
        ],
    )
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        object_store_memory=2 * 1024**3,
        include_dashboard=False,
    )
    DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    manifest = run_score(cfg)
    job_s = round(time.perf_counter() - started, 2)
    spilled = _spilled_bytes()
    ray.shutdown()
    return {
        "manifest": manifest.to_json(),
        "job_s": job_s,
        "peak_rss_mb": _peak_rss_mb(),
        "spilled_bytes": spilled,
    }


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss, which Linux keeps
    across fork and exec: it would report the rehearsal's own peak (its corpus in memory)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


def _spilled_bytes() -> int:
    """Bytes the local raylet spilled from the object store, from its log: the cumulative
    "Spilled N MiB" lines it writes while spilling, and its state dumps' bytes spilled."""
    import re

    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # this process's own cluster
    session = Path(node.get_session_dir_path()) if node else Path("/tmp/ray/session_latest")
    text = (session / "logs" / "raylet.out").read_text(errors="replace")
    mib = [int(n) * 2**20 for n in re.findall(r"Spilled (\d+) MiB", text)]
    dumped = [int(n) for n in re.findall(r"num bytes currently spilled: (\d+)", text)]
    return max([0, *mib, *dumped])


def _shards(run: dict[str, Any]) -> int:
    return len(run["manifest"]["inputs"])


def _tiny_student(folder: Path) -> str:
    tokenizer = train_tiny_tokenizer()
    # One small layer: the figures are the data flow's, not the model's.
    model = make_tiny_causal_lm(
        "llama",
        len(tokenizer),
        attn_implementation="sdpa",
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _cache_files(out: Path) -> int:
    return sum(1 for p in (out / "_cache").rglob("*.parquet") if not p.name.startswith("."))


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _meets(value: Any, op: str, target: float) -> bool | None:
    if value is None:
        return None
    return value <= target if op == "<=" else value >= target


def _print(results: dict[str, Any]) -> None:
    print(f"\nln-ray scale rehearsal: {results['rows']:,} rows in {results['shards']} shards "
          f"({results['machine']}, {results['date']})")  # fmt: skip
    print("  job seconds: " + ", ".join(f"{k} {v}" for k, v in results["job_s"].items()))
    for name, stages in results["rows_per_s"].items():
        print(f"  rows/s {name:10s} " + ", ".join(f"{s} {v}" for s, v in stages.items()))
    print("  growth over a quarter of the rows: " + ", ".join(
        f"{s} {v}" for s, v in results["growth_full_over_quarter"].items()))  # fmt: skip
    print(f"  driver peak RSS: {results['driver_peak_rss_mb']} MB at {results['rows']:,} rows, "
          f"{results['driver_peak_rss_mb_quarter']} MB at a quarter")  # fmt: skip
    for name, check in results["targets"].items():
        mark = {True: "ok", False: "MISSED", None: "n/a"}[check["met"]]
        print(f"  {name:30s} {results.get(name)!s:>12}  target {check['target']:8s} {mark}")
    print(f"  rows_per_shard_overhead_ms {results['rows_per_shard_overhead_ms']}")


if __name__ == "__main__":
    main()
