"""The ``ln-ray`` command: ``inspect`` (how an input will be read, from a sample), ``score``,
``select`` (re-run the reduce), ``summary``, ``report``, ``plan`` (what a run will cost, from a
sample of its input), ``config`` (every setting a run would use)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from ln_ray.config import ConfigError, LnRayConfig, load_config, to_dict

if TYPE_CHECKING:
    from ln_ray.io.manifest import RunManifest

USAGE_OVERRIDES = "key=value overrides, e.g. scoring.window=2 input.path=s3://bucket/traces/"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="ln-ray", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser(
        "inspect", help="how an input will be read, and sample rows as the student sees them"
    )
    inspect.add_argument("input_path", help="the input.path a run would read")
    inspect.add_argument("--config-name", default="default", help="a name in conf/ or a YAML path")
    inspect.add_argument("--rows", type=int, default=200, help="rows to read (a few files' first)")
    inspect.add_argument("--samples", type=int, default=2, help="rows to render")
    inspect.add_argument("overrides", nargs="*", help=USAGE_OVERRIDES)

    score = commands.add_parser("score", help="score traces and write every output")
    score.add_argument("--config-name", default="default", help="a name in conf/ or a YAML path")
    score.add_argument("overrides", nargs="*", help=USAGE_OVERRIDES)

    select = commands.add_parser(
        "select", help="re-run selections, teacher table and curated set over existing scores"
    )
    select.add_argument("output_path", help="output.path of a finished run")
    select.add_argument("overrides", nargs="*", help="e.g. selection.require_correct=false")

    summary = commands.add_parser("summary", help="print the teacher table of a finished run")
    summary.add_argument("output_path", help="output.path of a finished run")

    report = commands.add_parser("report", help="write report.html next to a finished run")
    report.add_argument("output_path", help="output.path of a finished run")

    plan = commands.add_parser(
        "plan", help="estimate a run's tokens, GPU-hours and storage from a sample of its input"
    )
    plan.add_argument("input_path", help="the input.path the run would read")
    plan.add_argument("--config-name", default="default", help="a name in conf/ or a YAML path")
    plan.add_argument("--gpus", type=int, default=8, help="GPUs for the scoring actors")
    plan.add_argument(
        "--gpu-tflops", type=float, default=989.0, help="peak dense TFLOP/s of one GPU (H100 bf16)"
    )
    plan.add_argument("--mfu", type=float, default=0.3, help="fraction of the peak reached")
    plan.add_argument("--sample", type=int, default=200, help="rows to prepare")
    plan.add_argument(
        "--new-fraction", type=float, default=1.0, help="share of traces not yet in the cache"
    )
    plan.add_argument("overrides", nargs="*", help=USAGE_OVERRIDES)

    config = commands.add_parser(
        "config", help="print every setting a run would use: the defaults, the YAML, the overrides"
    )
    config.add_argument("--config-name", default="default", help="a name in conf/ or a YAML path")
    config.add_argument("overrides", nargs="*", help=USAGE_OVERRIDES)

    args, extra = parser.parse_known_args(argv)
    # Overrides after an option (``inspect PATH --samples 3 key=value``) are overrides too.
    if extra and hasattr(args, "overrides") and all("=" in item for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ln_ray").setLevel(logging.INFO)
    from ln_ray.pipeline.job import JobError

    try:
        if args.command == "score":
            return _score(load_config(args.config_name, args.overrides))
        if args.command == "select":
            return _select(args.output_path, args.overrides)
        if args.command == "report":
            return _report(args.output_path)
        if args.command == "plan":
            return _plan(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "config":
            return _config(load_config(args.config_name, args.overrides))
        return _summary(args.output_path)
    except (ConfigError, JobError) as exc:
        print(f"ln-ray: {exc}", file=sys.stderr)
        return 2


def _score(cfg: LnRayConfig) -> int:
    from ln_ray.pipeline.display import live_display
    from ln_ray.pipeline.job import run_score

    with live_display():
        manifest = run_score(cfg)
    print(_summary_of(manifest, cfg.output.path))
    return 0


def _config(cfg: LnRayConfig) -> int:
    print(config_yaml(cfg), end="")
    return 0


def config_yaml(cfg: LnRayConfig) -> str:
    """``cfg`` as a YAML file that loads back to it, URLs redacted as in a manifest (the text may
    end up in a log); text with line breaks is written in double quotes, escapes and all."""
    import yaml

    from ln_ray.io.storage import redacted

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = '"' if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    tree = redacted(to_dict(cfg))
    return yaml.dump(tree, Dumper=Dumper, sort_keys=False, allow_unicode=True)


def _select(output_path: str, overrides: list[str]) -> int:
    from ln_ray.pipeline.display import live_display
    from ln_ray.pipeline.job import run_select

    cfg = finished_run_config(_read_manifest(output_path).config, output_path, overrides)
    with live_display():
        manifest = run_select(cfg)
    print(_summary_of(manifest, output_path))
    return 0


def finished_run_config(stored: dict, output_path: str, overrides: list[str]) -> LnRayConfig:
    """A finished run's config (as its manifest stores it) with ``overrides`` on top.

    Redacted values (URLs whose credentials the manifest masks) fall back to the defaults.
    """
    return load_config(None, [f"output.path={output_path}", *overrides], base=_unredacted(stored))


def _summary(output_path: str) -> int:
    print(_summary_of(_read_manifest(output_path), output_path))
    return 0


def _summary_of(manifest: RunManifest, output_path: str) -> str:
    from ln_ray.io.run_folder import OutputRoot, PublishedRun
    from ln_ray.pipeline.summary import format_summary

    published = PublishedRun(OutputRoot(output_path), manifest)
    return format_summary(manifest, published.table("teachers"), published.table("teacher_pairs"))


def _report(output_path: str) -> int:
    from ln_ray.report import write_report

    try:
        print(f"wrote {write_report(output_path)}")
    except FileNotFoundError as exc:
        print(f"ln-ray: {exc}", file=sys.stderr)
        return 2
    return 0


def _plan(args: argparse.Namespace) -> int:
    from ln_ray.io.storage import InputError
    from ln_ray.plan import format_plan, plan_run
    from ln_ray.score.vetting import StudentError

    cfg = load_config(args.config_name, [f"input.path={args.input_path}", *args.overrides])
    try:
        plan = plan_run(
            cfg,
            sample_rows=args.sample,
            gpus=args.gpus,
            gpu_tflops=args.gpu_tflops,
            mfu=args.mfu,
            new_fraction=args.new_fraction,
        )
    except (InputError, StudentError, ValueError) as exc:
        print(f"ln-ray: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ln_ray.inspect_input import inspect_input
    from ln_ray.io.storage import InputError
    from ln_ray.score.vetting import StudentError

    cfg = load_config(args.config_name, [f"input.path={args.input_path}", *args.overrides])
    try:
        print(inspect_input(cfg, rows=args.rows, samples=args.samples), end="")
    except (InputError, StudentError) as exc:
        print(f"ln-ray: {exc}", file=sys.stderr)
        return 2
    return 0


def _read_manifest(output_path: str) -> RunManifest:
    from ln_ray.pipeline.job import read_manifest

    return read_manifest(output_path)


def _unredacted(tree: dict) -> dict:
    kept: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            kept[key] = _unredacted(value)
        elif not (isinstance(value, str) and "***@" in value):
            kept[key] = value
    return kept


if __name__ == "__main__":
    sys.exit(main())
