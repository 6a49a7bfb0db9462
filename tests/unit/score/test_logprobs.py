"""The output head: a bf16 head is upcast a vocabulary slice at a time, with the logits of a
whole fp32 copy."""

from __future__ import annotations

import pytest
import torch

from ln_ray.score import logprobs
from ln_ray.score.logprobs import TokenHead
from tests.helpers import make_tiny_causal_lm


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [("llama", {}), ("gemma3_text", {"final_logit_softcapping": 30.0}), ("phi", {})],
    ids=["plain", "softcapped", "biased"],
)
def test_a_bf16_head_is_upcast_in_slices_with_the_logits_of_a_whole_copy(
    model_type, overrides, monkeypatch
):
    model = make_tiny_causal_lm(model_type, vocab_size=301, **overrides).to(torch.bfloat16)
    head = model.get_output_embeddings()
    d = head.weight.shape[1]
    monkeypatch.setattr(logprobs, "WEIGHT_SLICE_CELLS", 64 * d)  # 5 slices, the last one short
    token_head = TokenHead(model)
    assert token_head.vocab_slice == 64
    assert token_head.weight.data_ptr() == head.weight.data_ptr()  # the head, not a copy

    hidden = torch.randn(37, d, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole = TokenHead(model)
    whole.weight = head.weight.detach().float()  # what the head held before: one fp32 copy
    torch.testing.assert_close(token_head.logits(hidden), whole.logits(hidden), rtol=0, atol=0)

    targets = torch.randint(0, 301, (37,), generator=torch.Generator().manual_seed(1))
    lp, ranks = token_head.score(hidden, targets, with_rank=True, chunk=8)
    lp_whole, ranks_whole = whole.score(hidden, targets, with_rank=True, chunk=8)
    assert torch.equal(lp, lp_whole)
    assert torch.equal(ranks, ranks_whole)


def test_an_fp32_head_is_used_as_it_is():
    model = make_tiny_causal_lm("llama", vocab_size=101)
    head = model.get_output_embeddings()
    token_head = TokenHead(model)
    assert token_head.weight.data_ptr() == head.weight.data_ptr()
    hidden = torch.randn(5, head.weight.shape[1])
    assert torch.equal(token_head.logits(hidden), model.lm_head(hidden))
