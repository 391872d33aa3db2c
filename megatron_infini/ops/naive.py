"""Infini-attention as the paper writes it: one segment at a time. For reading and testing.

Munkhdalai et al. 2024 (arXiv 2404.07143), eqs. 1-10. Everything here is float32; the
output is cast back to the input dtype. The fast version is `fast.py`; the two are
compared forward and backward in tests/test_ops.py.

Legend: s sequence, b batch, hq / hkv query / key-value heads, g = hq // hkv,
dk / dv head dims, T length of the current segment.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import EPS, Memory, autocast_off, check_inputs, check_write, empty_memory, sigma
from .packed import check_cu_seqlens


@autocast_off  # the reference computes in float32 whatever the caller's autocast
def infini_attention_naive(
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
    write: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """Reference Infini-attention; same contract as `megatron_infini.ops.infini_attention`.
    Packed input (`cu_seqlens`): the documents are run one by one, each from an empty memory
    (the first from `memory`); the memory returned is the last document's."""
    s, b, hq, hkv, dk, dv = check_inputs(q, k, v, gate, segment_length, update, memory, q_local, k_local)
    check_write(write, s, b, hkv)
    if cu_seqlens is not None:
        cu = check_cu_seqlens(cu_seqlens, s, b)
        outs = []
        for i, (a, c) in enumerate(zip(cu, cu[1:])):
            doc = slice(a, c)
            out, memory = infini_attention_naive(
                q[doc], k[doc], v[doc], gate, segment_length=segment_length, update=update,
                memory=memory if i == 0 else None, softmax_scale=softmax_scale, eps=eps,
                q_local=None if q_local is None else q_local[doc], k_local=None if k_local is None else k_local[doc],
                write=None if write is None else write[doc])
            outs.append(out)
        return torch.cat(outs, dim=0), memory
    g = hq // hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dk)
    q_local = q if q_local is None else q_local
    k_local = k if k_local is None else k_local
    M, z = memory if memory is not None else empty_memory(b, hkv, dk, dv, q.device)
    beta = torch.sigmoid(gate.float()).view(1, hkv, g, 1, 1)  # (1, hkv, g, 1, 1)

    def heads(x: torch.Tensor) -> torch.Tensor:  # [T, b, h, d] -> (b, h, T, d), float32
        return x.float().permute(1, 2, 0, 3)

    outs = []
    for start in range(0, s, segment_length):
        seg = slice(start, min(start + segment_length, s))
        T = seg.stop - seg.start

        # 1. local causal softmax attention inside the segment (RoPE'd q/k if given)
        ql = heads(q_local[seg]).reshape(b, hkv, g, T, dk)  # (b, hkv, g, T, dk)
        kl = heads(k_local[seg]).unsqueeze(2)  # (b, hkv, 1, T, dk)
        vs = heads(v[seg])  # (b, hkv, T, dv)
        scores = ql @ kl.transpose(-1, -2) * scale  # (b, hkv, g, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        a_dot = torch.softmax(scores, dim=-1) @ vs.unsqueeze(2)  # (b, hkv, g, T, dv)

        # 2. retrieval from the memory left by the previous segments (q without RoPE)
        sq = sigma(heads(q[seg])).reshape(b, hkv, g, T, dk)  # (b, hkv, g, T, dk)
        num = sq @ M.unsqueeze(2)  # (b, hkv, g, T, dv)
        den = sq @ z.view(b, hkv, 1, dk, 1)  # (b, hkv, g, T, 1)
        a_mem = num / (den + eps)

        # 3. memory update with this segment's keys and values, after retrieval
        sk = sigma(heads(k[seg]))  # (b, hkv, T, dk)
        # write strengths (optional): token t is stored with weight w_t in M and in z
        skw = sk if write is None else sk * write[seg].float().permute(1, 2, 0).unsqueeze(-1)
        if update == "linear":
            M = M + skw.transpose(-1, -2) @ vs  # (b, hkv, dk, dv)
        else:  # delta rule: subtract what the memory already returns for these keys
            v_old = (sk @ M) / (sk @ z.unsqueeze(-1) + eps)  # (b, hkv, T, dv)
            M = M + skw.transpose(-1, -2) @ (vs - v_old)
        z = z + skw.sum(dim=-2)  # (b, hkv, dk)

        # 4. per-head gate
        a = beta * a_mem + (1.0 - beta) * a_dot  # (b, hkv, g, T, dv)
        outs.append(a.reshape(b, hq, T, dv).permute(2, 0, 1, 3))  # [T, b, hq, dv]

    return torch.cat(outs, dim=0).to(q.dtype), (M, z)
