"""Fast Infini-attention: all segments at once wherever the math allows.

- Local attention: segments are folded into the batch and run through one fused causal
  `scaled_dot_product_attention` call (flash / memory-efficient kernels where available).
- Linear update: the state before segment j is an exclusive prefix sum over segments of
  sigma(K_i)^T V_i and sum_t sigma(K_i,t), so every retrieval is one batched matmul.
- Delta update: the state must be built segment by segment (two matmuls per step); the
  retrievals are then one batched matmul over the stacked states.
- Optional activation checkpointing in blocks of segments: only the memory state at block
  boundaries is kept for backward, the rest is recomputed.

Legend: s sequence, b batch, hq / hkv query / key-value heads, g = hq // hkv, dk / dv head
dims, N segment length, n number of segments (the last one zero-padded to N).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from ._common import EPS, Memory, check_inputs, empty_memory, sigma


def infini_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    *,
    segment_length: int,
    update: str = "linear",
    memory: Optional[Memory] = None,
    q_local: Optional[torch.Tensor] = None,
    k_local: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    eps: float = EPS,
    checkpoint_segments: int = 0,
) -> Tuple[torch.Tensor, Memory]:
    """Infini-attention over a sequence cut into segments of `segment_length`.

    Args:
        q: [s, b, hq, dk] queries (no RoPE: the memory reads them), any float dtype.
        k: [s, b, hkv, dk] keys (no RoPE), hq % hkv == 0.
        v: [s, b, hkv, dv] values.
        gate: [hq] gate logits beta; output = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_dot.
        segment_length: N >= 1; the last segment may be shorter.
        update: "linear" or "delta" memory update.
        memory: None (empty) or (M [b, hkv, dk, dv], z [b, hkv, dk]) float32, the state left
            by earlier segments.
        q_local, k_local: optional tensors shaped like q / k used only by the local softmax
            attention (e.g. RoPE-rotated with in-segment positions). Default q / k.
        softmax_scale: local attention scale, default 1/sqrt(dk).
        eps: added to the retrieval denominators (an empty memory retrieves exactly 0).
        checkpoint_segments: 0 keeps all activations; k > 0 recomputes them in backward,
            in blocks of k segments, keeping only the memory state between blocks.

    Returns:
        out [s, b, hq, dv] in q's dtype, and the memory (M, z) after the last segment, float32.
        Calling the op on consecutive chunks (cut at segment boundaries) passing the memory
        along gives the same result as one call on the whole input.
    """
    s, b, hq, hkv, dk, dv = check_inputs(q, k, v, gate, segment_length, update, memory, q_local, k_local)
    if isinstance(checkpoint_segments, bool) or not isinstance(checkpoint_segments, int) or checkpoint_segments < 0:
        raise ValueError(f"checkpoint_segments must be an integer >= 0, got {checkpoint_segments!r}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dk)
    q_local = q if q_local is None else q_local
    k_local = k if k_local is None else k_local
    if memory is None:
        memory = empty_memory(b, hkv, dk, dv, q.device)
    M, z = memory

    block = checkpoint_segments * segment_length
    if block == 0 or not torch.is_grad_enabled():
        return _forward(q, k, v, gate, q_local, k_local, M, z, segment_length, update, scale, eps)

    outs = []
    for start in range(0, s, block):
        blk = slice(start, min(start + block, s))
        out, M, z = _checkpoint(
            _forward_flat, q[blk], k[blk], v[blk], gate, q_local[blk], k_local[blk], M, z,
            segment_length, update, scale, eps, use_reentrant=False,
        )
        outs.append(out)
    return torch.cat(outs, dim=0), (M, z)


def _forward_flat(*args):
    out, (M, z) = _forward(*args)
    return out, M, z


def _fold(x: torch.Tensor, n: int, N: int) -> torch.Tensor:
    """[s, b, h, d] -> [b*n, h, N, d]: segments folded into the batch (the last one zero-padded)."""
    s, b, h, d = x.shape
    if n * N != s:
        x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, n * N - s))  # [n*N, b, h, d]; the pad comes last
    return x.view(n, N, b, h, d).permute(2, 0, 3, 1, 4).reshape(b * n, h, N, d)


def _unfold(x: torch.Tensor, s: int, b: int) -> torch.Tensor:
    """[b*n, h, N, d] -> [s, b, h, d] (drops the padding)."""
    bn, h, N, d = x.shape
    n = bn // b
    return x.view(b, n, h, N, d).permute(1, 3, 0, 2, 4).reshape(n * N, b, h, d)[:s]


def local_attention_folded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_length: int, scale: Optional[float] = None
) -> torch.Tensor:
    """Causal attention inside each segment, segments folded into the batch: one fused call.

    q [s, b, hq, dk], k [s, b, hkv, dk], v [s, b, hkv, dv] -> [b*n, hq, N, dv] with
    N = min(segment_length, s) and n = ceil(s / N); rows past s are padding.
    """
    s, hq, hkv = q.shape[0], q.shape[2], k.shape[2]
    N = min(segment_length, s)
    n = -(-s // N)
    # Zero-padded keys sit after every real query of the last segment, so causality hides them.
    return F.scaled_dot_product_attention(
        _fold(q, n, N), _fold(k, n, N), _fold(v, n, N), is_causal=True, scale=scale, enable_gqa=hq != hkv
    )


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_length: int, scale: Optional[float] = None
) -> torch.Tensor:
    """Causal softmax attention inside each segment, all segments in one fused call.

    q [s, b, hq, dk], k [s, b, hkv, dk], v [s, b, hkv, dv] -> [s, b, hq, dv] in q's dtype.
    """
    return _unfold(local_attention_folded(q, k, v, segment_length, scale), q.shape[0], q.shape[1])


def _forward(q, k, v, gate, q_local, k_local, M0, z0, N, update, scale, eps, a_dot=None):
    """The op over one block. `a_dot`: the local attention in folded layout [b*n, hq, N, dv]
    when already computed (see `ops.context.infini_attention_deferred`), else computed here."""
    s, b, hq, dk = q.shape
    hkv, dv = v.shape[2], v.shape[3]
    g = hq // hkv
    N = min(N, s)  # one short segment when the input is shorter than a segment
    n = -(-s // N)
    pad = n * N - s

    if a_dot is None:
        a_dot = local_attention_folded(q_local, k_local, v, N, scale)  # [b*n, hq, N, dv]

    # Memory path in float32. Padding is applied after sigma so padded keys add nothing.
    def padded(x):  # [s, ...] -> [n*N, ...]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, pad)) if pad else x

    sq = padded(sigma(q))  # [n*N, b, hq, dk]
    sk = padded(sigma(k))  # [n*N, b, hkv, dk]
    vf = padded(v.float())  # [n*N, b, hkv, dv]
    sk = sk.view(n, N, b, hkv, dk).permute(2, 3, 0, 1, 4)  # (b, hkv, n, N, dk)
    vf = vf.view(n, N, b, hkv, dv).permute(2, 3, 0, 1, 4)  # (b, hkv, n, N, dv)
    sq = sq.view(n, N, b, hkv, g, dk).permute(2, 3, 0, 4, 1, 5).reshape(b, hkv, n, g * N, dk)

    dz = sk.sum(dim=3)  # (b, hkv, n, dk)
    cz = torch.cumsum(dz, dim=2)
    z_prev = torch.cat([z0.unsqueeze(2), z0.unsqueeze(2) + cz[:, :, :-1]], dim=2)  # (b, hkv, n, dk)
    z_last = z0 + cz[:, :, -1]
    if update == "linear":
        # per segment, not one batched matmul over permuted views: small cache-resident products
        dM = torch.stack([skj.transpose(-1, -2) @ vj for skj, vj in zip(sk.unbind(2), vf.unbind(2))], dim=2)  # (b, hkv, n, dk, dv)
        cM = torch.cumsum(dM, dim=2)
        M_prev = torch.cat([M0.unsqueeze(2), M0.unsqueeze(2) + cM[:, :, :-1]], dim=2)  # (b, hkv, n, dk, dv)
        M_last = M0 + cM[:, :, -1]
    else:
        states = []
        M = M0
        # unbind, not indexing: one backward stack instead of a full-size zero tensor per segment
        steps = zip(sk.unbind(2), vf.unbind(2), z_prev.unbind(2))  # (b, hkv, N, dk), (b, hkv, N, dv), (b, hkv, dk)
        for skj, vj, zj in steps:  # sequential: each update reads the state the previous one left
            states.append(M)
            v_old = (skj @ M) / (skj @ zj.unsqueeze(-1) + eps)  # (b, hkv, N, dv)
            M = M + skj.transpose(-1, -2) @ (vj - v_old)
        M_prev = torch.stack(states, dim=2)  # (b, hkv, n, dk, dv)
        M_last = M

    num = sq @ M_prev  # (b, hkv, n, g*N, dv)
    den = sq @ z_prev.unsqueeze(-1)  # (b, hkv, n, g*N, 1)

    # Gate and normalisation in one pass, in the local attention's folded layout:
    # out = (1 - beta) * A_dot + num * beta / (den + eps)
    beta = torch.sigmoid(gate.float()).view(hkv, g, 1, 1)  # broadcasts over (..., hkv, g, N, dv)
    den = den.view(b, hkv, n, g, N, 1).permute(0, 2, 1, 3, 4, 5)  # (b, n, hkv, g, N, 1)
    weight = beta / (den + eps)  # (b, n, hkv, g, N, 1)
    num = num.view(b, hkv, n, g, N, dv).permute(0, 2, 1, 3, 4, 5)  # (b, n, hkv, g, N, dv)
    local = a_dot.float().view(b, n, hkv, g, N, dv) * (1.0 - beta)  # (b, n, hkv, g, N, dv)
    out = torch.addcmul(local, num, weight)  # (b, n, hkv, g, N, dv)
    out = _unfold(out.view(b * n, hq, N, dv), s, b)  # [s, b, hq, dv]
    return out.to(q.dtype), (M_last, z_last)
