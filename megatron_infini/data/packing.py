"""Document boundaries of a micro batch: Megatron's `reset_attention_mask`, `reset_position_ids`
and `eod_mask_loss`, built from the EOS tokens of the packed windows.

A training window holds whole documents packed back to back, each ending in EOS (see
`dataset`). The meanings follow Megatron-LM's `_get_ltor_masks_and_position_ids`
(megatron/core/datasets/gpt_dataset.py), applied to the *inputs* `tokens[:, :-1]`:

- a document ends with its EOS: the next one starts at the input position after each EOS,
  and a window's first (partial) document starts at the window start;
- `reset_position_ids`: positions count from 0 at each document start;
- `eod_mask_loss`: the loss is 0 where the input token is EOS, i.e. on the prediction of the
  first token of the next document, across the boundary (the EOS itself is still learned);
- `reset_attention_mask`: documents do not see each other. Instead of Megatron's dense mask
  the batch becomes one packed sequence in Megatron's THD layout: `b` windows flattened to
  `[1, b * s]` with `cu_seqlens` int32 `[num_docs + 1]` (0, every document start, b * s). The
  window edges are always boundaries, so windows stay independent too.

With every switch off, `pack_batch` returns today's tensors unchanged (`[b, s]` inputs and
labels, positions 0..s-1, no loss mask, no boundaries).

Legend: b windows of the micro batch, s sequence length (tokens are `[b, s + 1]`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class PackedBatch:
    """What the model's forward takes for one micro batch (see the module docstring).

    inputs, labels, position_ids: int64 `[b, s]`, or `[1, b * s]` with `cu_seqlens`.
    loss_mask: float32 of the same shape (0 = no loss), or None (every token counts).
    cu_seqlens: int32 `[num_docs + 1]` document starts in the flattened sequence, or None.
    max_seqlen: the longest document (0 without `cu_seqlens`).
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0


def document_starts(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """bool `[b, s]`: True where a document starts (column 0, and after every EOS input)."""
    starts = torch.zeros_like(inputs, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = inputs[:, :-1] == eos_id
    return starts


def reset_positions(starts: torch.Tensor) -> torch.Tensor:
    """int64 positions counting from 0 at every True of `starts` `[b, s]` (column 0 is True)."""
    b, s = starts.shape
    idx = torch.arange(s, device=starts.device).expand(b, s)
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # [b, s]
    return idx - last_start


def pack_batch(
    tokens: torch.Tensor,
    eos_id: int,
    *,
    reset_attention_mask: bool = False,
    reset_position_ids: bool = False,
    eod_mask_loss: bool = False,
) -> PackedBatch:
    """One micro batch of windows `tokens` int64 `[b, s + 1]` -> the model's inputs (module docstring)."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [b, s + 1] with s >= 1, got shape {tuple(tokens.shape)}")
    inputs, labels = tokens[:, :-1], tokens[:, 1:]  # [b, s]
    b, s = inputs.shape
    starts = document_starts(inputs, eos_id) if (reset_attention_mask or reset_position_ids) else None
    if reset_position_ids:
        position_ids = reset_positions(starts)
    else:
        position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand_as(inputs)
    loss_mask = (inputs != eos_id).float() if eod_mask_loss else None
    if not reset_attention_mask:
        return PackedBatch(inputs, labels, position_ids, loss_mask)

    flat = starts.reshape(-1)  # [b * s]; every window's column 0 is a start
    begin = torch.nonzero(flat).squeeze(1)
    cu_seqlens = torch.cat([begin, begin.new_tensor([b * s])]).to(torch.int32)  # [num_docs + 1]
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedBatch(
        inputs.reshape(1, b * s), labels.reshape(1, b * s), position_ids.reshape(1, b * s),  # [1, b * s]
        None if loss_mask is None else loss_mask.reshape(1, b * s), cu_seqlens, max_seqlen,
    )
