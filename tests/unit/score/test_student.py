"""Loading and vetting the student (ln_ray/score/student.py, vetting.py): its identity, which keys
the score cache, follows the weights and the dtype; students the scorer cannot score exactly are
refused before any work."""

from __future__ import annotations

import json
import shutil

import pytest

from ln_ray.config import StudentConfig
from ln_ray.score import student
from ln_ray.score.student import check_student, load_student
from ln_ray.score.vetting import StudentError
from tests.helpers import make_tiny_llama


def test_identity_follows_the_weights_retrained_in_place(tiny_tokenizer, tmp_path, monkeypatch):
    folder = tmp_path / "student"
    make_tiny_llama(len(tiny_tokenizer), seed=0, attn="sdpa").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    cfg = StudentConfig(model=str(folder), cache_dir=str(tmp_path / "cache"))
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    before = check_student(cfg).identity
    assert check_student(cfg).identity == before and before.startswith(str(folder))

    make_tiny_llama(len(tiny_tokenizer), seed=1, attn="sdpa").save_pretrained(folder)
    assert weights.stat().st_size == size  # same architecture: only the content differs
    after = check_student(cfg).identity
    assert after != before

    # The weights' digest is kept, not recomputed on every start.
    def no_hashing(path):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(student, "_file_sha256", no_hashing)
    assert check_student(cfg).identity == after


def test_identity_holds_the_dtype_the_model_runs_in(tiny_student_dir, tmp_path):
    def identity(dtype: str, want_gpu: bool = False) -> str:
        cfg = StudentConfig(model=tiny_student_dir, dtype=dtype, cache_dir=str(tmp_path))
        return check_student(cfg, want_gpu=want_gpu).identity

    assert identity("auto") == identity("float32")  # auto is fp32 on CPU
    assert identity("auto", want_gpu=True) == identity("bfloat16") != identity("float32")
    # A scoring actor on CPU names the student as the driver does.
    loaded = load_student(StudentConfig(model=tiny_student_dir, cache_dir=str(tmp_path)))
    assert loaded.identity == identity("auto")


def test_a_student_the_scorer_cannot_score_exactly_fails_before_any_work(
    tiny_student_dir, tmp_path
):
    folder = tmp_path / "softcapped"
    shutil.copytree(tiny_student_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": 50.0}))
    with pytest.raises(StudentError, match="softcaps attention logits"):
        check_student(StudentConfig(model=str(folder), cache_dir=str(tmp_path / "cache")))


def test_a_multi_head_latent_attention_student_is_refused_before_any_work(tmp_path):
    """DeepSeek-V3-style attention: value heads smaller than query heads (RoPE and no-RoPE
    parts), which the packed attention's output buffer cannot hold."""
    from bench.tiny import tiny_config

    folder = tmp_path / "mla"
    tiny_config(
        "deepseek_v3",
        128,
        num_hidden_layers=1,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        kv_lora_rank=16,
        q_lora_rank=None,
    ).save_pretrained(folder)
    with pytest.raises(StudentError, match="value heads of size 16 and query heads of size 24"):
        check_student(StudentConfig(model=str(folder), cache_dir=str(tmp_path / "cache")))


def _hub_snapshot(cache, repo: str, commit: str, files: dict[str, bytes]) -> None:
    """A snapshot of ``repo`` in a Hugging Face cache laid out as the Hub's client writes it:
    files linked to blobs named by their content, and refs/main naming the commit."""
    import hashlib
    import os

    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)


def test_a_hub_students_identity_is_its_snapshot(tiny_tokenizer, tmp_path, monkeypatch):
    """A new snapshot of the same name (new weights, a fixed template) is another student; the
    same snapshot is the same student, in any cache."""
    import huggingface_hub

    from bench.tiny import CHATML

    saved = tmp_path / "saved"
    make_tiny_llama(len(tiny_tokenizer), seed=0, attn="sdpa").save_pretrained(saved)
    tiny_tokenizer.save_pretrained(saved)
    files = {p.name: p.read_bytes() for p in saved.iterdir() if p.is_file()}
    retrained = tmp_path / "retrained"
    make_tiny_llama(len(tiny_tokenizer), seed=1, attn="sdpa").save_pretrained(retrained)

    def identity(cache) -> str:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        return check_student(StudentConfig(model="org/tiny", cache_dir=str(tmp_path))).identity

    _hub_snapshot(tmp_path / "hub-a", "org/tiny", "a" * 40, files)
    first = identity(tmp_path / "hub-a")
    assert first.startswith("org/tiny@")
    _hub_snapshot(tmp_path / "hub-b", "org/tiny", "a" * 40, files)
    assert identity(tmp_path / "hub-b") == first  # the same snapshot on another node
    weights = (retrained / "model.safetensors").read_bytes()
    _hub_snapshot(tmp_path / "hub-a", "org/tiny", "b" * 40, {**files, "model.safetensors": weights})
    assert identity(tmp_path / "hub-a") != first  # refs/main moved to new weights
    fixed = CHATML.replace("assistant\n", "assistant\n\n")  # a template fixed upstream
    assert fixed != CHATML
    template = {**files, "chat_template.jinja": fixed.encode()}
    _hub_snapshot(tmp_path / "hub-c", "org/tiny", "a" * 40, template)  # even at one commit
    assert identity(tmp_path / "hub-c") not in (first, identity(tmp_path / "hub-a"))


def test_a_hub_student_missing_from_the_cache_says_so(tmp_path, monkeypatch):
    import huggingface_hub

    from ln_ray.score.student import hub_snapshot

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(StudentError, match="not in the local Hugging Face cache"):
        hub_snapshot("org/absent")
