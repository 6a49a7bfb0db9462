"""Structured configuration: one dataclass per section, YAML files in conf/, dotlist overrides.

Every job starts with :func:`load_config`, which merges a YAML file and ``key=value`` overrides onto
the dataclass schema (so an unknown key or a value of the wrong type fails at once) and then checks
the values that types alone cannot (ranges, enums, combinations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, StringNode
from omegaconf.errors import OmegaConfBaseException

from ln_ray.prepare.layout import LAYOUTS, check_pattern
from ln_ray.prepare.reasoning import REASONING_MODES, ReasoningFormat
from ln_ray.prepare.render import VIEWS, RenderOptions
from ln_ray.prepare.segment import SEGMENT_MODES
from ln_ray.schema import MESSAGES_FORMATS, SELECTED_BY

# conf/ at the top of the checkout; ln_ray/conf links to it, and a wheel carries a copy.
CONF_DIR = Path(__file__).resolve().parent / "conf"

INPUT_FORMATS = ("auto", "parquet", "jsonl")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SHUFFLES = ("sort", "hash")
# apply_chat_template's own parameters and the template's messages: not template arguments.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    [
        *("conversation", "messages", "tools", "documents", "chat_template"),
        *("add_generation_prompt", "continue_final_message", "tokenize", "tokenizer_kwargs"),
        *("sanitize_control_tokens", "padding", "truncation", "max_length", "return_tensors"),
        *("return_dict", "return_assistant_tokens_mask"),
    ]
)


class ConfigError(ValueError):
    """A configuration that cannot run: unknown key, wrong type or bad value."""


@dataclass
class ColumnsConfig:
    """Names of the input columns; ``steps``, ``correct``, ``messages``, ``reasoning`` and
    ``system`` are optional. A name with dots names a nested field (``info.think_content``).
    ``messages`` may hold OpenAI-style or ShareGPT-style conversations."""

    prompt: str = "prompt"
    response: str = "response"
    reasoning: str = "reasoning"
    teacher: str = "teacher"
    prompt_id: str = "prompt_id"
    steps: str = "steps"
    correct: str = "correct"
    messages: str = "messages"
    system: str = "system"
    responses: str = "generations"  # input.layout=per_prompt: the list of responses


@dataclass
class InputConfig:
    """Where the traces are: a file, folder or glob on any fsspec filesystem. A file larger than
    ``split_bytes`` is read by several tasks, each about that much of it. ``teacher_from_path``
    takes each file's teacher from its path: ``hive`` (``teacher=NAME/`` folders) or a regular
    expression with a group named ``teacher`` (and optionally ``prompt_set``). ``layout``:
    ``per_trace`` (a row is one trace) or ``per_prompt`` (a row is one prompt with a list of
    responses in ``columns.responses``)."""

    path: str = "ln_ray/demo/traces.jsonl"
    format: str = "auto"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    split_bytes: int = 64 * 2**20
    teacher_from_path: str | None = None
    layout: str = "per_trace"


@dataclass
class OutputConfig:
    """Where scores, selections, teacher tables and the curated set are written; the newest
    ``keep_runs`` finished runs keep their folders (the published one always does); the score
    cache under it holds ``cache_buckets`` files (by a hash of trace_id). A run that rejects
    more than ``max_reject_fraction`` of its rows (duplicates aside) fails instead of
    publishing; a run holds the output's lease, which others may break once it has missed its
    heartbeat for ``lease_timeout_s``."""

    path: str = "outputs/demo"
    keep_runs: int = 3
    cache_buckets: int = 64
    merge_parts: int = 256  # while scoring, the cache's parts are merged this many at a time
    max_reject_fraction: float = 0.05
    lease_timeout_s: float = 600.0
    messages_format: str = "openai"  # curated/'s conversation: openai messages, or sharegpt


@dataclass
class StudentConfig:
    """The student model that judges the traces.

    ``model`` is a Hugging Face model id (already in the local cache), a local model directory, a
    ``.gguf`` file, or the named default ``smollm2-135m``. ``template_kwargs`` are extra variables
    for its chat template (``enable_thinking``...); ``reasoning_open`` and ``reasoning_close`` are
    the markers it writes around its reasoning (used with ``scoring.reasoning: student`` and for
    a reasoning given in its own column).
    """

    model: str = "smollm2-135m"
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_download: bool = False
    chat_template: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    reasoning_open: str = "<think>\n"
    reasoning_close: str = "\n</think>\n\n"
    cache_dir: str | None = None


@dataclass
class SegmentConfig:
    """How responses are split into steps when the input has no ``steps`` column."""

    mode: str = "sentence"
    min_chars: int = 8


@dataclass
class ScoringConfig:
    """What is computed for each trace (see DESIGN.md, "Definitions").

    ``render``: the student's view, ``generation`` (context and generation prompt, then the
    response) or ``conversation`` (the whole conversation through the template). ``reasoning``:
    ``as_given`` scores responses as written, ``student`` re-presents marked reasoning in the
    student's markers. ``ifd``: also score each response given no prompt, for ``ifd`` and
    ``ifd_ppl`` (its tokens once more through the model; off, they are NaN).
    """

    render: str = "generation"
    reasoning: str = "as_given"
    window: int = 4
    window_fraction: float | None = None
    rank_clip: int = 100
    max_tokens: int | None = None  # None: the student's declared context
    max_response_chars: int = 400_000
    ifd: bool = True


@dataclass
class SelectionConfig:
    """How one trace per prompt is chosen and how teachers are compared. ``curate_by``: the
    metric whose selection makes the curated set (any of ``schema.SELECTED_BY``)."""

    require_correct: bool = True
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    stability_replicates: int = 100
    curate_by: str = "lalp"


@dataclass
class ComputeConfig:
    """Resources: the scoring actor pool and the batch sizes that feed it."""

    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    prepare_cpus: float = 1.0
    batch_traces: int = 16
    token_budget: int = 4096
    prefix_budget: int = 32768  # prompt tokens whose keys/values a scorer holds at once
    head_chunk: int = 0
    torch_threads: int = 0
    shuffle: str = "sort"
    max_retries: int = 2
    progress_s: float = 30.0
    ray_progress: bool = False  # Ray Data's own per-operator progress and execution logs
    min_cpus: float = 0.0  # the job waits for a cluster this large before it plans its reads
    min_gpus: float = 0.0
    wait_for_cluster_s: float = 1800.0


@dataclass
class LnRayConfig:
    """The whole job configuration."""

    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)


def load_config(
    config_name: str | None = "default",
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> LnRayConfig:
    """Build a validated config from ``conf/<name>.yaml`` (or a YAML path) and dotlist overrides.

    Args:
        config_name: A name in ``conf/`` (without ``.yaml``), a path to a YAML file, or None for the
            built-in defaults.
        overrides: ``key=value`` strings, e.g. ``["scoring.window=2", "input.path=s3://b/x"]``.
        base: A nested dict of config values (a finished run's, from its manifest), applied after
            the YAML file and before the overrides. Its values are taken as they are, not parsed.

    Returns:
        The typed config object.

    Raises:
        ConfigError: On an unknown key, a value of the wrong type or a value out of range.
    """
    schema = OmegaConf.structured(LnRayConfig)
    try:
        layers: list[Any] = [schema]
        if config_name is not None:
            layers.append(_load_yaml(_config_path(config_name)))
        if base is not None:
            layers.append(OmegaConf.create(base))
        if overrides:
            layers.extend(_override_layers(schema, list(overrides)))
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc)) from None
    except yaml.YAMLError as exc:  # an override's value is parsed as YAML
        raise ConfigError(f"bad override value: {str(exc).splitlines()[0]}") from None
    cfg: LnRayConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate_config(cfg)
    return cfg


def _override_layers(schema: Any, overrides: list[str]) -> list[Any]:
    """Dotlist overrides as config layers, in order. A value for a string key is kept as typed
    (YAML would read ``teacher=yes`` as true and ``prompt_id=007`` as 7); ``null`` still unsets
    an optional one. Other values are parsed as YAML, so numbers, booleans and lists work."""
    layers = []
    for item in overrides:
        key, sep, value = item.partition("=")
        node = _schema_node(schema, key.strip()) if sep else None
        if isinstance(node, StringNode) and not (value == "null" and node._is_optional()):
            layer = OmegaConf.create()
            OmegaConf.update(layer, key.strip(), value, force_add=True)
            layers.append(layer)
        else:
            layers.append(OmegaConf.from_dotlist([item]))
    return layers


def _schema_node(schema: Any, key: str) -> Any:
    """The schema's node for a dotted key (None when there is none)."""
    node = schema
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return node


def validate_config(cfg: LnRayConfig) -> None:
    """Check the values that the schema's types cannot; raise ConfigError listing every problem."""
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(bool(cfg.input.path), "input.path is empty")
    need(cfg.input.format in INPUT_FORMATS, f"input.format must be one of {INPUT_FORMATS}")
    need(bool(cfg.output.path), "output.path is empty")
    need(cfg.input.split_bytes >= 1, "input.split_bytes must be >= 1")
    need(cfg.input.layout in LAYOUTS, f"input.layout must be one of {LAYOUTS}")
    if cfg.input.teacher_from_path is not None:
        problem = check_pattern(cfg.input.teacher_from_path)
        need(problem is None, problem or "")
    need(cfg.output.keep_runs >= 1, "output.keep_runs must be >= 1")
    need(cfg.output.cache_buckets >= 1, "output.cache_buckets must be >= 1")
    need(cfg.output.merge_parts >= 2, "output.merge_parts must be >= 2")
    need(
        0.0 <= cfg.output.max_reject_fraction <= 1.0,
        "output.max_reject_fraction must be in [0, 1]",
    )
    need(cfg.output.lease_timeout_s > 0, "output.lease_timeout_s must be > 0")
    need(
        cfg.output.messages_format in MESSAGES_FORMATS,
        f"output.messages_format must be one of {MESSAGES_FORMATS}",
    )
    need(
        cfg.selection.curate_by in SELECTED_BY,
        f"selection.curate_by must be one of {SELECTED_BY}",
    )
    need(
        cfg.scoring.ifd or not cfg.selection.curate_by.startswith("ifd"),
        f"selection.curate_by={cfg.selection.curate_by} needs scoring.ifd=true",
    )
    need(bool(cfg.student.model), "student.model is empty")
    need(cfg.student.dtype in DTYPES, f"student.dtype must be one of {DTYPES}")
    need(cfg.segment.mode in SEGMENT_MODES, f"segment.mode must be one of {SEGMENT_MODES}")
    need(cfg.segment.min_chars >= 0, "segment.min_chars must be >= 0")
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(cfg.student.template_kwargs))
    need(not reserved, f"student.template_kwargs may not set {reserved} (ln-ray sets those)")
    need(bool(cfg.student.reasoning_open.strip()), "student.reasoning_open is empty")
    need(bool(cfg.student.reasoning_close.strip()), "student.reasoning_close is empty")
    need(cfg.scoring.render in VIEWS, f"scoring.render must be one of {VIEWS}")
    need(
        cfg.scoring.reasoning in REASONING_MODES,
        f"scoring.reasoning must be one of {REASONING_MODES}",
    )
    need(cfg.scoring.window >= 0, "scoring.window must be >= 0")
    frac = cfg.scoring.window_fraction
    need(frac is None or 0.0 < frac <= 1.0, "scoring.window_fraction must be in (0, 1] or null")
    need(cfg.scoring.rank_clip >= 1, "scoring.rank_clip must be >= 1")
    cap = cfg.scoring.max_tokens
    need(cap is None or cap >= 1, "scoring.max_tokens must be >= 1 or null")
    need(cfg.scoring.max_response_chars >= 1, "scoring.max_response_chars must be >= 1")
    need(cfg.selection.bootstrap_samples >= 0, "selection.bootstrap_samples must be >= 0")
    need(cfg.selection.stability_replicates >= 1, "selection.stability_replicates must be >= 1")
    need(0.0 < cfg.selection.confidence < 1.0, "selection.confidence must be in (0, 1)")
    need(cfg.selection.seed >= 0, "selection.seed must be >= 0")
    need(cfg.compute.actors >= 1, "compute.actors must be >= 1")
    need(cfg.compute.gpus_per_actor >= 0, "compute.gpus_per_actor must be >= 0")
    need(cfg.compute.cpus_per_actor > 0, "compute.cpus_per_actor must be > 0")
    need(cfg.compute.prepare_cpus > 0, "compute.prepare_cpus must be > 0")
    need(cfg.compute.batch_traces >= 1, "compute.batch_traces must be >= 1")
    need(cfg.compute.token_budget >= 16, "compute.token_budget must be >= 16")
    need(cfg.compute.prefix_budget >= 1, "compute.prefix_budget must be >= 1")
    need(cfg.compute.head_chunk >= 0, "compute.head_chunk must be >= 0 (0: by device)")
    need(cfg.compute.torch_threads >= 0, "compute.torch_threads must be >= 0 (0: automatic)")
    need(cfg.compute.shuffle in SHUFFLES, f"compute.shuffle must be one of {SHUFFLES}")
    need(cfg.compute.max_retries >= 0, "compute.max_retries must be >= 0")
    need(cfg.compute.progress_s > 0, "compute.progress_s must be > 0")
    need(cfg.compute.min_cpus >= 0, "compute.min_cpus must be >= 0")
    need(cfg.compute.min_gpus >= 0, "compute.min_gpus must be >= 0")
    need(cfg.compute.wait_for_cluster_s > 0, "compute.wait_for_cluster_s must be > 0")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def to_yaml(cfg: LnRayConfig) -> str:
    """Render a config back to YAML (for logs and the manifest)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: LnRayConfig) -> dict[str, Any]:
    """Plain nested dict of a config."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def _load_yaml(path: Path) -> Any:
    """A config file's settings.

    Raises:
        ConfigError: It is not valid YAML (the message names the file, line and column).
    """
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML{where}: {problem}"
        ) from None


def _config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = CONF_DIR / f"{name}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
    raise ConfigError(f"no config named {name!r}: use one of {known} or a path to a .yaml file")


def _explain(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    message = str(exc).splitlines()[0]
    if "not in struct" in message or "Key '" in message and "not in" in message:
        return f"unknown config key {key!r}" if key else message
    return f"bad value for {key!r}: {message}" if key else message


def render_options(student: StudentConfig, scoring: ScoringConfig) -> RenderOptions:
    """The student's view of a trace, from the config."""
    return RenderOptions(
        view=scoring.render,
        template_kwargs=dict(student.template_kwargs),
        reasoning_markers=(student.reasoning_open, student.reasoning_close),
    )


def prepare_options(cfg: LnRayConfig) -> dict[str, Any]:
    """``prepare_row``'s keyword arguments for a run of ``cfg``: a row prepared outside the job
    (``ln-ray plan``, ``ln-ray inspect``) is segmented, capped and rendered as the job does."""
    return {
        "segment_mode": cfg.segment.mode,
        "min_step_chars": cfg.segment.min_chars,
        "max_response_chars": cfg.scoring.max_response_chars,
        "render": render_options(cfg.student, cfg.scoring),
        "reasoning": reasoning_format(cfg.student, cfg.scoring),
    }


def reasoning_format(student: StudentConfig, scoring: ScoringConfig) -> ReasoningFormat:
    """How reasoning is presented to the student, from the config."""
    return ReasoningFormat(
        mode=scoring.reasoning, open=student.reasoning_open, close=student.reasoning_close
    )
