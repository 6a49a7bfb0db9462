"""Per-token log-probabilities and ranks from hidden states, a chunk of rows at a time.

The full ``[tokens x vocab]`` logits of a long trace would not fit (32K tokens x 150K vocab x 4
bytes is 19 GB), so the language-model head runs on ``chunk`` rows at a time and each chunk is
reduced at once to the two numbers kept per token. The head's weight stays in the student's
dtype: a bf16 or fp16 head is upcast to fp32 a slice of the vocabulary at a time (at most
``WEIGHT_SLICE_CELLS`` entries), never copied whole (a 150K x 3.5K head would be 2 GB more per GPU).
"""

from __future__ import annotations

import torch

WEIGHT_SLICE_CELLS = 1 << 24  # head weight upcast to fp32 at once, at most (64 MB)


class TokenHead:
    """The student's output projection, applied in fp32.

    Args:
        model: A transformers causal LM.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        head = model.get_output_embeddings()
        # fp32 logits even for bf16 weights: ranks compare logits, and bf16 would create ties.
        self.weight = head.weight.detach()
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach().float()
        self.vocab_slice = max(1, WEIGHT_SLICE_CELLS // self.weight.shape[1])
        config = model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(config, "logit_scale", None)  # Cohere multiplies by it
        # Granite (and MiniCPM3, before its bias-free head) divide by ``logits_scaling``;
        # HyperCLOVAX's field of that name is a multiplier.
        scaling = getattr(config, "logits_scaling", None)
        if scaling is not None and getattr(config, "model_type", None) == "hyperclovax":
            self.scale, scaling = scaling, None
        self.divisor = scaling

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[rows, vocab]`` for hidden states ``[rows, d]``."""
        logits = self._project(hidden.float())
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ weight.T + bias`` in fp32, upcasting the weight a vocabulary slice at a
        time when it is not fp32 already."""
        if self.weight.dtype == torch.float32:
            return torch.nn.functional.linear(hidden, self.weight, self.bias)
        vocab = self.weight.shape[0]
        logits = torch.empty(hidden.shape[0], vocab, dtype=torch.float32, device=hidden.device)
        for v in range(0, vocab, self.vocab_slice):
            rows = slice(v, v + self.vocab_slice)
            bias = None if self.bias is None else self.bias[rows]
            logits[:, rows] = torch.nn.functional.linear(hidden, self.weight[rows].float(), bias)
        return logits

    def score(
        self, hidden: torch.Tensor, targets: torch.Tensor, *, with_rank: bool, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-prob (and rank) of each target token.

        Args:
            hidden: ``[n, d]`` final hidden states; row ``j`` predicts ``targets[j]``.
            targets: ``[n]`` token ids.
            with_rank: Also compute ranks (1 + number of logits strictly greater).
            chunk: Rows per head projection.

        Returns:
            ``(logprobs, ranks)``: fp32 ``[n]`` and int64 ``[n]`` (or None).
        """
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ranks = torch.empty(n, dtype=torch.int64, device=hidden.device) if with_rank else None
        for a in range(0, n, chunk):
            logits = self.logits(hidden[a : a + chunk])
            target = logits.gather(1, targets[a : a + chunk, None])
            logprobs[a : a + chunk] = target[:, 0] - torch.logsumexp(logits, dim=1)
            if ranks is not None:
                # Counting in fp32 is exact below 2**24 entries and faster than a bool sum.
                ranks[a : a + chunk] = (logits > target).float().sum(dim=1).long() + 1
        return logprobs, ranks
