"""Chat templates that behave like the students people distil into, written for the tests.

Each keeps the one behaviour of its family that matters to scoring:

- ``R1_DISTILL``: DeepSeek-R1-Distill. An assistant turn in the history loses everything up to
  ``</think>``; the generation prompt opens ``<think>\\n`` itself.
- ``QWEN3``: Qwen3. The last assistant turn's reasoning (``reasoning_content``, or the text
  before ``</think>``) is cut out, stripped of newlines and re-emitted as
  ``<think>\\n..\\n</think>\\n\\n`` before the answer; ``enable_thinking=false`` makes the
  generation prompt close an empty reasoning block.
- ``LLAMA3``: Llama 3.x. Every message's content is trimmed.
- ``CHATML``: plain ChatML (SmolLM2's family), which changes nothing.
"""

from __future__ import annotations

import copy

from bench.tiny import CHATML
from ln_ray.prepare.reasoning import ReasoningFormat

R1_DISTILL = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

QWEN3 = (
    "{% for message in messages %}"
    "{% if message.role == 'user' or message.role == 'system' %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{% elif message.role == 'assistant' %}"
    "{% set content = message.content %}{% set reasoning_content = '' %}"
    "{% if message.reasoning_content is defined and message.reasoning_content is not none %}"
    "{% set reasoning_content = message.reasoning_content %}"
    "{% elif '</think>' in content %}"
    "{% set reasoning_content = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{% endif %}"
    "{% if loop.last %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{% else %}{{ '<|im_start|>assistant\\n' + content }}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

FAMILIES = {"r1_distill": R1_DISTILL, "qwen3": QWEN3, "llama3": LLAMA3, "chatml": CHATML}

# Real-style reasoning traces (as teachers such as DeepSeek-R1 and QwQ write them).
REASONING = (
    "Okay, so the farmer has a wolf, a goat and a cabbage. Wait, the boat holds all of them.\n\n"
    "So he can take everything across in one trip. Let me double-check: 3 items, one boat.\n"
)
ANSWER = "The farmer crosses once, with the wolf, the goat and the cabbage."
TRACES = {
    "think": f"<think>\n{REASONING}</think>\n\n{ANSWER}",
    "think_extra_newlines": f"<think>\n\n{REASONING}\n</think>\n\n\n\n{ANSWER}",
    "think_unclosed": f"<think>\n{REASONING}",
    "close_only": f"{REASONING}</think>\n\n{ANSWER}",
    "plain": f"{REASONING}\n{ANSWER}",
    "harmony": (
        f"<|channel|>analysis<|message|>{REASONING}<|end|><|start|>assistant"
        f"<|channel|>final<|message|>{ANSWER}<|return|>"
    ),
}

# What each family writes after an assistant turn: the end-of-turn (never scored, never context).
END_OF_TURN = {
    "r1_distill": "<｜end▁of▁sentence｜>",
    "qwen3": "<|im_end|>\n",
    "llama3": "<|eot_id|>",
    "chatml": "<|im_end|>\n",
}


PROMPT = "A farmer must cross a river with a wolf, a goat and a cabbage. How?"
MODES = {"as_given": ReasoningFormat(), "student": ReasoningFormat(mode="student")}
_SPECIAL = ["<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"]
_SPECIAL += ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def with_markers(tokenizer):
    """A copy of ``tokenizer`` that knows the families' role markers and the reasoning tags as
    added tokens, as the real students' tokenizers do."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": _SPECIAL})
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def templated(tokenizer, family: str):
    """A shallow copy of ``tokenizer`` with ``family``'s chat template."""
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = FAMILIES[family]
    return tokenizer


def trace_row(response: str) -> dict:
    """An input row answering ``PROMPT`` with ``response``."""
    return {"prompt_id": "q1", "prompt": PROMPT, "teacher": "t", "response": response}


def scored_text(family: str, response: str) -> str:
    """The documented rule: R1-distill's generation prompt opens ``<think>\\n`` itself, so a
    response opening with it meets it once; every other family scores the response whole."""
    if family == "r1_distill" and response.startswith("<think>\n"):
        return response[len("<think>\n") :]
    return response
