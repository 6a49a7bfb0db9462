"""Shared fixtures: a tiny trained tokenizer, a tiny random Llama, and the real SmolLM2 student."""

from __future__ import annotations

import copy

import pytest

from bench.moto import moto_s3_server
from bench.tiny import train_tiny_tokenizer
from ln_ray.config import StudentConfig
from tests.helpers import make_tiny_llama
from tests.templates import with_markers


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process, with a ChatML template."""
    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def marker_tokenizer(tiny_tokenizer):
    """The tiny tokenizer, knowing the template families' role markers and reasoning tags."""
    return with_markers(tiny_tokenizer)


@pytest.fixture
def tiny_pair(tiny_tokenizer):
    """Two copies of one tiny Llama: one for the fast scorer, one for the reference."""
    model = make_tiny_llama(len(tiny_tokenizer))
    return model, copy.deepcopy(model)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct student (converted once from its GGUF, then cached)."""
    from ln_ray.score.student import load_student

    return load_student(StudentConfig(model="smollm2-135m"))


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama and the tiny tokenizer saved as a local model directory."""
    folder = tmp_path_factory.mktemp("tiny-student")
    make_tiny_llama(len(tiny_tokenizer), attn="sdpa").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def leaky_student_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama's weights as remote code whose MLPs mix in the previous position
    (tests/students/modeling_leaky.py): vetting sees nothing wrong, its packed scores are wrong."""
    import json
    import shutil

    from tests.helpers import REPO

    folder = tmp_path_factory.mktemp("leaky-student")
    make_tiny_llama(len(tiny_tokenizer), attn="sdpa").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    shutil.copy(REPO / "tests" / "students" / "modeling_leaky.py", folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "leaky_llama"
    config["auto_map"] = {
        "AutoConfig": "modeling_leaky.LeakyConfig",
        "AutoModelForCausalLM": "modeling_leaky.LeakyForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback; s3fs finds it through AWS_ENDPOINT_URL (set before Ray)."""
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real local Ray cluster of 2 CPUs (workers inherit the S3 endpoint settings)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
