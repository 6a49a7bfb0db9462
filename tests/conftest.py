"""Shared fixtures: a tiny trained tokenizer, a tiny random Llama, and the real SmolLM2 student."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from templates import CHATML

from ln_ray.config import StudentConfig

_CORPUS = [
    "First, compute the total cost: 3 apples at $2 each is 6 dollars.",
    "Then add the 4 dollar sandwich, so the total is 10 dollars.",
    "Wait, let me double-check the arithmetic. 3 * 2 = 6 and 6 + 4 = 10.",
    "The train travels 120 km in 2 hours, so its speed is 60 km/h.",
    "So the answer is 10. Therefore the farmer crosses the river first.",
    "<think>\nLet me think step by step about this puzzle.\n</think>\n\nThe answer is 42.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def make_tiny_llama(vocab_size: int, seed: int = 0, attn: str = "eager"):
    """A 2-layer random Llama with grouped-query attention (fp32, CPU)."""
    return make_tiny_causal_lm("llama", vocab_size, seed, attn_implementation=attn)


def make_tiny_causal_lm(model_type: str, vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer random causal LM of any transformers family (fp32, CPU, eager attention).

    Its weights are larger than the default, which gives peaked, varied distributions (ranks
    beyond 1, real ties unlikely) and so makes exact-rank comparisons meaningful.

    Args:
        model_type: The family's config name (``mistral``, ``gemma3_text``, ``granite``...).
        vocab_size: Vocabulary size.
        seed: Weight seed.
        **overrides: Config settings under test (a sliding window, a logit scale...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        attn_implementation="eager",
    )
    config = AutoConfig.for_model(model_type, **{**settings, **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    return model


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
def s3_server():
    """moto's S3 server on loopback; s3fs finds it through AWS_ENDPOINT_URL (set before Ray)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret-key",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield f"http://{host}:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real local Ray cluster of 2 CPUs (workers inherit the S3 endpoint settings)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
