"""The LM head and its cross-entropy in chunks of tokens (vocab-parallel), without the logits
of the whole sequence.

Megatron computes logits [s, b, V / tp] for every token, then a float32 copy for the loss:
at 32K tokens x 128K vocab that is ~16 GB per sample. Here the tokens are cut into chunks of
`chunk` tokens; each chunk's logits live only inside the loop, forward and again in backward
(recomputed from the hidden states), so the extra memory is O(chunk x V / tp), whatever the
sequence length. Same loss as Megatron's `vocab_parallel_cross_entropy` (float32 logits,
log-sum-exp over the tensor-parallel ranks' vocabulary shards).

Shape legend: n tokens (s * b, flattened), h hidden, v vocabulary rows on this rank (V / tp),
c tokens per chunk.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

#: Tokens per chunk by default: logits of 4096 tokens x 128K vocab are 2 GB in float32.
DEFAULT_CHUNK = 4096


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk: int = DEFAULT_CHUNK,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Per-token cross-entropy of the logits hidden @ weight^T, computed in chunks of tokens.

    Args:
        hidden: [n, h] hidden states (any float dtype; the full sequence on every
            tensor-parallel rank).
        weight: [v, h] this rank's rows of the output layer (vocabulary shard
            rank * v .. (rank + 1) * v - 1), hidden's dtype.
        labels: [n] integer target ids in 0..v * tp - 1.
        chunk: tokens per chunk (>= 1).
        tp_group: tensor-parallel group over which the vocabulary is split (None: not split).

    Returns:
        loss [n] float32: logsumexp(logits) - logits[label]. Backward gives hidden's gradient
        for this rank's shard (sum it over the group, as Megatron's column-parallel layer does)
        and weight's gradient.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [n, h] and weight [v, h] must agree, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [n={hidden.shape[0]}], got {tuple(labels.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk, tp_group)


def _tp(group) -> tuple:
    """(rank, size) of the tensor-parallel group (0, 1 without one)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, op, group, size: int) -> torch.Tensor:
    if size > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward keeps hidden, weight, labels and the per-token log-sum-exp; backward recomputes
    each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, group):
        rank, size = _tp(group)
        v = weight.shape[0]
        local = labels - rank * v  # [n]: label's row in this shard when 0 <= local < v
        mine = (local >= 0) & (local < v)
        local = torch.where(mine, local, torch.zeros_like(local))
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)  # [n]
        target = torch.empty(n, dtype=torch.float32, device=hidden.device)  # [n]
        for i in range(0, n, chunk):
            logits = (hidden[i:i + chunk] @ weight.t()).float()  # [c, v]
            picked = logits.gather(-1, local[i:i + chunk].unsqueeze(-1)).squeeze(-1)  # [c]
            target[i:i + chunk] = _all_reduce(picked * mine[i:i + chunk], dist.ReduceOp.SUM, group, size)
            top = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, group, size)  # [c]
            sum_exp = logits.sub_(top.unsqueeze(-1)).exp_().sum(dim=-1)  # in place: one [c, v] buffer
            lse[i:i + chunk] = top + torch.log(_all_reduce(sum_exp, dist.ReduceOp.SUM, group, size))
            del logits
        ctx.save_for_backward(hidden, weight, local, mine, lse)
        ctx.chunk = chunk
        return lse - target

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local, mine, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad_hidden = torch.empty_like(hidden)  # [n, h]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # [v, h]
        grad_loss = grad_loss.float()
        for i in range(0, hidden.shape[0], chunk):
            h = hidden[i:i + chunk]  # [c, h]
            # d loss / d logits = softmax - onehot(label), times the token's incoming gradient
            g = (h @ weight.t()).float().sub_(lse[i:i + chunk].unsqueeze(-1)).exp_()  # [c, v] softmax
            rows = torch.arange(g.shape[0], device=g.device)
            g[rows, local[i:i + chunk]] -= mine[i:i + chunk].float()
            g = g.mul_(grad_loss[i:i + chunk].unsqueeze(-1)).to(weight.dtype)  # [c, v]
            grad_hidden[i:i + chunk] = g @ weight
            grad_weight.add_(g.t() @ h)  # [v, h], accumulated in float32
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None
