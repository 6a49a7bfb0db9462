"""A student whose layers mix tokens outside attention, as remote code might: each MLP output
also takes in the position before it (a one-step convolution). Nothing in its config says so,
so only the self-check can tell that its packed scores would not be its own.

Saved beside a tiny Llama's weights as remote code (``auto_map``), by tests/conftest.py.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


class LeakyConfig(LlamaConfig):
    model_type = "leaky_llama"


class LeakyForCausalLM(LlamaForCausalLM):
    config_class = LeakyConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp.register_forward_hook(_shift_in_previous_position)


def _shift_in_previous_position(module, inputs, output):
    previous = torch.zeros_like(output)
    previous[..., 1:, :] = inputs[0][..., :-1, :]
    return output + 0.5 * previous
