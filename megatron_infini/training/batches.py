"""The trainer's micro batch: windows -> model inputs, this rank's context-parallel block, the loss.

`prepare_batch` applies `data.reset_attention_mask` / `reset_position_ids` / `eod_mask_loss`
(`megatron_infini.data.packing.pack_batch`) and the per-token loss weights, then cuts this
rank's contiguous context-parallel block. With document resets the micro batch is one packed
sequence `[1, b * s]`: context-parallel rank r holds tokens `[r * b * s / cp, (r + 1) * b * s / cp)`
of it (windows in order) and every rank gets the same global `cu_seqlens`, so the layer knows
where each document starts in the whole sequence; a rank boundary may fall anywhere in a
document, even inside one of its segments (the layer relays that segment's rows). Tensor (and sequence)
parallel ranks get identical inputs; Megatron splits the sequence inside the model.

`batch_loss` is the mean over the labels that count: sum(w * loss) / sum(w) with the weight sum
taken over the whole sequence (all context-parallel ranks), scaled so that the mean over the
context-parallel group, which gradient averaging takes, is that loss.

Legend: b micro batch, s sequence length, cp context-parallel size.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist

from megatron_infini.data.packing import PackedBatch, pack_batch

from .config import Config


def prepare_batch(tokens: torch.Tensor, weights: Optional[torch.Tensor], cfg: Config, eos_id: int,
                  device: torch.device, cp_group=None) -> PackedBatch:
    """tokens int64 `[b, s + 1]` (and optional per-token weights of the same shape, the weight of
    each token as a label) -> this rank's `PackedBatch` (its `loss_mask` folds in the weights)."""
    d = cfg.data
    batch = pack_batch(tokens.to(device), eos_id, reset_attention_mask=d.reset_attention_mask,
                       reset_position_ids=d.reset_position_ids, eod_mask_loss=d.eod_mask_loss)
    if weights is not None:
        w = weights[:, 1:].to(device).float().reshape(batch.labels.shape)  # [b, s] or [1, b * s]
        batch.loss_mask = w if batch.loss_mask is None else batch.loss_mask * w
    if cp_group is not None and dist.get_world_size(cp_group) > 1:  # this rank's contiguous block
        from megatron_infini.parallel import split_for_context_parallel

        n = cfg.model.segment_length
        inputs, labels, position_ids = (split_for_context_parallel(t, 1, cp_group, n)
                                        for t in (batch.inputs, batch.labels, batch.position_ids))
        mask = None if batch.loss_mask is None else split_for_context_parallel(batch.loss_mask, 1, cp_group, n)
        batch = replace(batch, inputs=inputs, labels=labels, position_ids=position_ids, loss_mask=mask)
    return batch


def model_kwargs(batch: PackedBatch) -> dict:
    """Extra `GPTModel.forward` arguments: `packed_seq_params` (THD) for a packed batch, else none."""
    if batch.cu_seqlens is None:
        return {}
    from megatron.core.packed_seq_params import PackedSeqParams

    return {"packed_seq_params": PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=batch.cu_seqlens, cu_seqlens_kv=batch.cu_seqlens,
        max_seqlen_q=batch.max_seqlen, max_seqlen_kv=batch.max_seqlen)}


def batch_loss(per_token: torch.Tensor, loss_mask: Optional[torch.Tensor], cp_group=None) -> torch.Tensor:
    """This rank's loss from per-token losses (shaped like the labels); see the module docstring."""
    if loss_mask is None:
        return per_token.float().mean()
    total = loss_mask.sum()
    cp = 1 if cp_group is None else dist.get_world_size(cp_group)
    if cp > 1:
        total = total.detach().clone()
        dist.all_reduce(total, group=cp_group)
    return (per_token.float() * loss_mask).sum() * cp / total.clamp(min=1.0)
