"""Pieces of the op for context parallelism (a rank holds a contiguous block of whole segments).

- `memory_delta`: what a block of keys/values adds to the memory under the linear rule,
  sigma(K)^T V and sum_t sigma(K_t). The linear state is additive, so the memory a rank starts
  from is the exclusive prefix sum of the deltas of the ranks before it.
- `infini_attention_deferred`: the op with the initial memory supplied by a callable that is
  called only after the local (in-segment) attention has run, so a rank computes its local
  attention while the memory of the ranks before it is still in flight.

Legend as in `ops._common`: s sequence, b batch, hq / hkv query / key-value heads, dk / dv
head dims; M [b, hkv, dk, dv] and z [b, hkv, dk] float32.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from ._common import EPS, Memory, check_inputs, unpack_memory
from .fast import _forward, _LinearDeltas, local_attention_folded
from .packed import local_attention_buckets, pack_qkv, packed_layout, unpack, write_mask


def memory_delta(k: torch.Tensor, v: torch.Tensor) -> Memory:
    """Linear-rule memory delta of a block of keys and values.

    k [s, b, hkv, dk], v [s, b, hkv, dv] (any float dtype, keys without RoPE) ->
    (dM [b, hkv, dk, dv], dz [b, hkv, dk]), float32: dM = sum_t sigma(k_t)^T v_t and
    dz = sum_t sigma(k_t). With the linear rule the op's final memory equals its initial
    memory plus this delta, whatever the segment length.
    """
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k [s, b, hkv, dk] and v [s, b, hkv, dv] must agree, got {tuple(k.shape)} and {tuple(v.shape)}")
    return unpack_memory(_LinearDeltas.apply(k, v, k.shape[0])[0])  # the whole block as one segment


def infini_attention_deferred(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    *,
    segment_length: int,
    get_memory: Callable[[], Memory],
    update: str = "linear",
    q_local: Optional[torch.Tensor] = None,
    k_local: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    eps: float = EPS,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Memory]:
    """`infini_attention(..., memory=get_memory())`, with `get_memory()` called after the
    local softmax attention of all segments has been computed (it may wait for other ranks).

    Arguments and results as `ops.infini_attention` (no activation checkpointing: with
    `checkpoint_segments` > 0 call `get_memory()` first and use `infini_attention`).
    get_memory: returns (M [b, hkv, dk, dv], z [b, hkv, dk]) float32 (packed input: the state
    the first document continues from).
    """
    s, b, _, hkv, _, _ = check_inputs(q, k, v, gate, segment_length, update, None, q_local, k_local)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q_local = q if q_local is None else q_local
    k_local = k if k_local is None else k_local
    layout = write = packing = None
    if cu_seqlens is not None:  # packed documents: the padded segment layout (ops.packed)
        layout = packed_layout(cu_seqlens, s, b, segment_length, q.device)
        write, packing = write_mask(layout, None, b, hkv, q.device, update), layout.packing
        q, k, v, q_local, k_local = pack_qkv(layout, q, k, v, q_local, k_local)  # [n * N, 1, h, d]
        segment_length = layout.N
    if layout is None:
        a_dot = local_attention_folded(q_local, k_local, v, segment_length, scale)  # [b*n, hq, N, dv]
    else:
        a_dot = local_attention_buckets(q_local, k_local, v, segment_length, scale, packing.lengths)  # [n, hq, N, dv]
    memory = get_memory()
    check_inputs(q, k, v, gate, segment_length, update, memory, None, None)
    M, z = memory
    out, memory = _forward(q, k, v, gate, q_local, k_local, M, z, segment_length, update, scale, eps, a_dot=a_dot,
                           write=write, packing=packing)
    return (out if layout is None else unpack(out, layout)), memory
