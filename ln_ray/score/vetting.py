"""Which students ln-ray can score exactly, and the error for those it cannot.

The packed scorer (``scorer.py``) reproduces a plain forward pass for the attention it knows. A
student is trusted in three layers:

- ``COVERED_MODEL_TYPES``: the families whose packed scoring the equivalence tests prove against a
  plain forward (``tests/equivalence/test_families.py``, each past its sliding window);
- ``check_scorable`` and ``check_structure`` refuse, before any work, the architectures whose
  features the packed path does not reproduce: softcapped attention logits, multi-head latent
  attention, dynamic RoPE, longrope past its switch, attention sinks, chunked attention, and
  layers that are not attention (convolutions, state-space and linear-attention layers carry
  state from one packed sequence into the next);
- every scoring actor proves its student on a probe before it scores (``proof.py``), listed or
  not.

``global_cap`` says how long a global sequence may be. ``check_scorable`` reads only a model
config and ``check_structure`` a model built on the meta device, so the driver checks a student
without loading its weights.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

UNDECLARED_CONTEXT_CAP = 32768  # the global cap for a student whose config declares no context

# Model types whose packed scoring tests/equivalence/test_families.py proves against a plain
# forward on tiny random students (each past its sliding window, where it has one).
COVERED_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma3_text",
        "phi3",
        "olmo2",
        "granite",
        "cohere",
        "hyperclovax",
    }
)
# Layer types whose token mixing is attention the packed scorer reproduces, and those that mix
# no tokens at all (position-wise feed-forward layers of hybrid models).
_ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention"})
POSITIONWISE_LAYERS = frozenset({"mlp", "moe", "dense"})
# Config fields that only models with recurrent or convolutional layers declare (read when the
# config has no ``layer_types``).
_RECURRENT_FIELDS = (
    "ssm_state_size",
    "mamba_d_ssm",
    "mamba_d_state",
    "mamba_n_heads",
    "linear_num_value_heads",
    "conv_L_cache",
    "rescale_every",  # RWKV
    "lru_width",  # RecurrentGemma
)
_WHAT_TO_DO = f"choose a student of a covered family ({', '.join(sorted(COVERED_MODEL_TYPES))})"


class StudentError(RuntimeError):
    """The student model cannot be found, loaded or scored exactly."""


def model_type(config: Any) -> str:
    """The student's model type (of its text model, for a multimodal config)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(getattr(config, "model_type", "") or "unknown")


def is_covered(config: Any) -> bool:
    """Whether the equivalence tests cover the student's family (``COVERED_MODEL_TYPES``)."""
    return model_type(config) in COVERED_MODEL_TYPES


def declared_context(model: Any) -> int | None:
    """The longest sequence the student's config declares it was built for, if any."""
    return config_context(getattr(model, "config", None))


def config_context(config: Any) -> int | None:
    """``declared_context`` from a model config alone."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_scorable(config: Any, max_tokens: int) -> int | None:
    """Refuse a student whose architecture the packed scorer cannot score exactly.

    Args:
        config: The student's model config.
        max_tokens: The global cap the scorer uses.

    Returns:
        For a longrope student (Phi-3 and later), whose RoPE frequencies switch to long factors
        once a sequence is longer than ``original_max_position_embeddings``: that length; else
        None. Longer windows run alone (``plan_windows``), so nothing else sees their factors.

    Raises:
        StudentError: The student softcaps attention logits (Gemma-2); its value heads differ in
            size from its query heads (multi-head latent attention); its RoPE is dynamic NTK
            (transformers rescales it with a call's length and keeps the new frequencies for
            later calls, so scores would depend on batch order); it is longrope with
            ``max_tokens`` past the switch, where one long global sequence would change the
            frequencies of every sequence packed with it; it has chunked attention (Llama-4:
            the chunks live in the attention mask, which the packed path does not build); or
            it has layers that are not attention (their state leaks between packed sequences).
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    _check_layers(config)
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap:
        raise StudentError(
            f"the student softcaps attention logits (attn_logit_softcapping={softcap}), "
            "which ln-ray's packed attention does not reproduce: choose another student"
        )
    value_size, query_size = _head_sizes(config)
    if value_size is not None and query_size is not None and value_size != query_size:
        raise StudentError(
            f"the student's attention has value heads of size {value_size} and query heads of "
            f"size {query_size} (multi-head latent attention, as in DeepSeek-V2/V3 and "
            "MiniCPM3), which ln-ray's packed attention does not support: choose another student"
        )
    limits = []
    for rope in _rope_settings(config):
        rope_type = str(rope.get("rope_type", rope.get("type", "default")))
        if "dynamic" in rope_type:
            raise StudentError(
                f"the student's RoPE is dynamic NTK (rope_type={rope_type!r}): transformers "
                "rescales it with each call's length and keeps the rescaled frequencies for "
                "later calls, so scores would depend on batch order: use a student config "
                "without dynamic RoPE scaling"
            )
        if rope_type == "longrope":
            limits.append(
                rope.get("original_max_position_embeddings")
                or config.original_max_position_embeddings
            )
    limit = min(limits, default=None)
    if limit is not None and max_tokens > limit:
        raise StudentError(
            f"the student's RoPE (longrope) switches to long factors for sequences longer "
            f"than {limit} tokens, which would make scores depend on batch mates: set "
            f"scoring.max_tokens <= {limit} (the global cap is {max_tokens})"
        )
    return limit


def check_structure(model: Any) -> None:
    """Refuse a student whose modules hold a feature the packed scorer does not reproduce.

    Reads module and parameter names only, so it runs on a model built on the meta device (the
    driver, before any work) as well as on the loaded one (each scoring actor).

    Raises:
        StudentError: The student's attention has sinks (gpt-oss): a learned logit every
            softmax adds to its denominator, which the packed kernels do not add.
    """
    sinks = [name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] == "sinks"]
    if sinks:
        raise StudentError(
            f"the student's attention has sinks ({sinks[0]}, model type "
            f"{model_type(model.config)}), a learned logit in every softmax that ln-ray's packed "
            f"attention does not add: {_WHAT_TO_DO}"
        )


def _check_layers(config: Any) -> None:
    """Refuse chunked attention and layers that are not attention, as the config declares them."""
    kind = model_type(config)
    layer_types = list(getattr(config, "layer_types", None) or [])
    chunked = getattr(config, "attention_chunk_size", None)
    if "chunked_attention" in layer_types or (chunked and not layer_types):
        raise StudentError(
            f"the student has chunked attention (model type {kind}, attention_chunk_size="
            f"{chunked}): each layer attends within chunks that its attention mask draws, which "
            f"ln-ray's packed attention does not reproduce: {_WHAT_TO_DO}"
        )
    other = sorted(set(layer_types) - _ATTENTION_LAYERS - POSITIONWISE_LAYERS)
    blocks = getattr(config, "layers_block_type", None)
    if not other and isinstance(blocks, list | tuple):
        other = sorted({str(b) for b in blocks} - {"attention"} - POSITIONWISE_LAYERS)
    pattern = getattr(config, "hybrid_override_pattern", None)
    if not other and isinstance(pattern, str) and "M" in pattern:
        other = ["mamba"]
    if not other and not layer_types:
        other = [name for name in _RECURRENT_FIELDS if getattr(config, name, None) is not None]
    if other:
        raise StudentError(
            f"the student has layers that are not attention (model type {kind}: "
            f"{', '.join(other)}); convolution, state-space and linear-attention layers carry "
            f"state from one packed sequence into the next, so ln-ray's packed scores would "
            f"not be the student's: {_WHAT_TO_DO}"
        )


def _head_sizes(config: Any) -> tuple[int | None, int | None]:
    """The value head size a config declares apart from its query heads, and the query head
    size (MLA configs split it into a part with RoPE and one without); (None, None) where the
    config declares no value head size of its own."""
    value = getattr(config, "v_head_dim", None)
    if value is None:
        return None, None
    query = (getattr(config, "qk_nope_head_dim", 0) or 0) + (
        getattr(config, "qk_rope_head_dim", 0) or 0
    )
    return value, query or getattr(config, "head_dim", None)


def _rope_settings(config: Any) -> list[dict[str, Any]]:
    """The student's RoPE settings: one dict, or one per layer type (Gemma-3)."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(parameters, dict):
        return []
    if "rope_type" in parameters or "type" in parameters:
        return [parameters]
    return [value for value in parameters.values() if isinstance(value, dict)]


def global_cap(config: Any, max_tokens: int | None) -> int:
    """The global cap a scorer uses for a student of ``config`` and ``scoring.max_tokens``."""
    return resolve_global_cap(config_context(config), max_tokens)


def resolve_global_cap(context: int | None, max_tokens: int | None) -> int:
    """The global cap from a declared context (None: undeclared) and ``scoring.max_tokens``."""
    if max_tokens is None:
        return context or UNDECLARED_CONTEXT_CAP
    if context is not None and max_tokens > context:
        log.warning(
            "max_tokens %d is beyond the student's declared context of %d tokens: global "
            "log-probs past it are extrapolation",
            max_tokens,
            context,
        )
    return max_tokens
