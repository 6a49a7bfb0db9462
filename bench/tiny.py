"""Tiny students for tests and benchmarks: a BPE tokenizer trained in-process and a small
random-initialized causal LM of any transformers family (no download, seconds to build)."""

from __future__ import annotations

import torch

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SENTENCES = [
    "First, compute the total cost: 3 apples at $2 each is 6 dollars.",
    "Then add the 4 dollar sandwich, so the total is 10 dollars.",
    "Wait, let me double-check the arithmetic. 3 * 2 = 6 and 6 + 4 = 10.",
    "The train travels 120 km in 2 hours, so its speed is 60 km/h.",
    "So the answer is 10. Therefore the farmer crosses the river first.",
    "<think>\nLet me think step by step about this puzzle.\n</think>\n\nThe answer is 42.",
]


def train_tiny_tokenizer(vocab_size: int = 400, corpus: list[str] = SENTENCES):
    """A byte-level BPE tokenizer trained in-process, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


# The shape of every tiny student: 2 layers of 4 query heads (2 key/value heads) of 16.
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """The config of a tiny student of ``model_type`` (``TINY_SHAPE``, then ``overrides``)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**TINY_SHAPE, "vocab_size": vocab_size, **overrides})


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
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, vocab_size, **{"attn_implementation": "eager", **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    return model
