"""What ln-ray's scorer is measured against.

``NaiveScorer`` computes the same numbers the way research scripts do: every window is its own
``prefix + window`` sequence, windows run in right-padded batches through the model's plain forward,
and the full ``[batch x length x vocab]`` log-softmax is taken before picking the targets.

``dense_forward`` is the practical limit: the model's plain forward over as many tokens as
ln-ray's plan runs, in dense batches with no padding and no packing tricks. Each global sequence
runs as it is (a batch of one); the window tokens run as ``[B, L]`` batches, ``L`` the plan's mean
window length, so their attention costs about what the windows' attention costs. The output
projection runs on as many rows as ln-ray scores. Nothing that only ln-ray needs (segment
attention, prefix sharing, log-softmax, ranks) is in it.
"""

from __future__ import annotations

import numpy as np
import torch

from ln_ray.prepare.render import TokenizedTrace
from ln_ray.score.scorer import ScoringPlan
from ln_ray.score.windows import context_starts


class NaiveScorer:
    """Global and local log-probs with one plain forward per window.

    Args:
        model: A transformers causal LM with its ordinary attention.
        window: Local window ``k`` in steps.
        batch_size: Windows per padded batch.
        pad_id: Token id used for padding (masked out).
    """

    def __init__(self, model: torch.nn.Module, *, window: int, batch_size: int, pad_id: int):
        self.model = model
        self.window = window
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.model_tokens = 0  # tokens run through the model, padding included

    @torch.inference_mode()
    def score(self, trace: TokenizedTrace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(global log-probs, global ranks, local log-probs)`` of the response tokens."""
        ids = trace.input_ids
        p = trace.prefix_len
        device = self.model.device
        logits = self.model(torch.from_numpy(ids)[None].to(device)).logits[0].float()
        self.model_tokens += len(ids)
        logprobs = torch.log_softmax(logits, dim=-1)
        rows = torch.arange(p - 1, len(ids) - 1, device=device)
        targets = torch.from_numpy(ids[p:]).to(device)
        target_logits = logits[rows, targets]
        global_lp = logprobs[rows, targets].cpu().numpy()
        global_rank = ((logits[rows] > target_logits[:, None]).sum(dim=1) + 1).cpu().numpy()

        bounds = trace.step_bounds
        starts = context_starts(trace.n_steps, self.window)
        windows = [
            (int(bounds[starts[i]]), int(bounds[i]), int(bounds[i + 1]))
            for i in range(trace.n_steps)
            if bounds[i + 1] > bounds[i]
        ]
        local_lp = np.empty(trace.n_response, dtype=np.float32)
        for a in range(0, len(windows), self.batch_size):
            batch = windows[a : a + self.batch_size]
            seqs = [np.concatenate([ids[:p], ids[p + c : p + stop]]) for c, _, stop in batch]
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for b, seq in enumerate(seqs):
                input_ids[b, : len(seq)] = torch.from_numpy(seq)
                mask[b, : len(seq)] = 1
            out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
            out = out.logits.float()
            self.model_tokens += input_ids.numel()
            logprobs = torch.log_softmax(out, dim=-1)
            for b, (c, first, stop) in enumerate(batch):
                # Response token j sits at p + j - c in the window; the row before it predicts it.
                rows = torch.arange(p + first - c - 1, p + stop - c - 1, device=device)
                targets = torch.from_numpy(ids[p + first : p + stop]).to(device)
                local_lp[first:stop] = logprobs[b, rows, targets].cpu().numpy()
        return global_lp, global_rank, local_lp


@torch.inference_mode()
def dense_forward(
    model: torch.nn.Module, plan: ScoringPlan, *, token_budget: int, head_chunk: int
) -> int:
    """Run the body over the plan's tokens in dense batches, and the head over its scored rows.

    Returns:
        The number of tokens run through the body.
    """
    body = model.base_model
    head = model.get_output_embeddings()
    tokens = 0
    for seq in plan.global_sequences:
        ids = torch.from_numpy(seq.tokens)[None].to(model.device)
        hidden = body(input_ids=ids, use_cache=False)
        scored_from = len(seq.tokens) - len(seq.targets)
        _project(head, hidden.last_hidden_state[0, scored_from:], head_chunk)
        tokens += len(seq.tokens)
    windows = plan.window_sequences
    if windows:
        ids = torch.from_numpy(np.concatenate([w.tokens for w in windows])).to(model.device)
        length = max(1, round(len(ids) / len(windows)))
        rows = max(1, token_budget // length)
        scored = sum(len(w.targets) for w in windows)
        for a in range(0, len(ids), rows * length):
            part = ids[a : a + rows * length]
            full = len(part) // length * length
            for batch in (part[:full].view(-1, length), part[full:][None]):
                if batch.numel():
                    hidden = body(input_ids=batch, use_cache=False).last_hidden_state
                    # The head's share: scored rows in proportion to this batch's tokens.
                    share = round(scored * batch.numel() / len(ids))
                    _project(head, hidden.reshape(-1, hidden.shape[-1])[:share], head_chunk)
        tokens += len(ids)
    return tokens


def _project(head: torch.nn.Module, hidden: torch.Tensor, chunk: int) -> None:
    for a in range(0, len(hidden), chunk):
        head(hidden[a : a + chunk])
