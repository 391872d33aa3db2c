"""Which fused SDPA kernel the local attention gets, so it never falls back to the math kernel.

On CUDA, `F.scaled_dot_product_attention` picks flash, memory-efficient, cuDNN or, failing all
of them, the *math* kernel, which materialises every score matrix and runs several times
slower, silently. Grouped-query attention (`enable_gqa=True`) is the trap: the flash kernel
takes it but needs fp16/bf16, and the memory-efficient kernel (the one for float32) does not
take it. So for float32 GQA on CUDA the key/value heads are expanded to the query heads
(`repeat_interleave`, the same head order `enable_gqa` uses) and the call goes without
`enable_gqa`. CPU kernels take GQA in every dtype. The plan is logged once per case.

Legend: q (B, hq, N, dk), k (B, hkv, N, dk), v (B, hkv, N, dv), hq % hkv == 0.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)
_LOGGED: set = set()


class SdpaPlan(NamedTuple):
    kernel: str
    """The fused kernel expected to run: "flash", "efficient" or "cpu"."""
    expand_kv: bool
    """True: k/v are expanded to the query heads before the call (no `enable_gqa`)."""


def sdpa_plan(device_type: str, dtype: torch.dtype, head_dim: int, gqa: bool) -> SdpaPlan:
    """The kernel for inputs of `dtype` (the autocast dtype when autocast is on) on `device_type`.

    flash: CUDA, fp16/bf16, head_dim a multiple of 8 up to 256; it takes GQA as is.
    efficient: every other CUDA case (float32 included); it does not take GQA, so k/v are
    expanded. CPU: one fused kernel for every dtype, GQA included.
    """
    if device_type != "cuda":
        return SdpaPlan("cpu", False)
    if dtype in _HALF and head_dim % 8 == 0 and head_dim <= 256:
        return SdpaPlan("flash", False)
    return SdpaPlan("efficient", gqa)


def _effective_dtype(q: torch.Tensor) -> torch.dtype:
    """q's dtype, or the autocast dtype when autocast is on for q's device (SDPA is cast)."""
    dev = q.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return q.dtype


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                plan: Optional[SdpaPlan] = None) -> torch.Tensor:
    """Causal SDPA over (B, h, N, d) tensors with grouped-query k/v, on a fused kernel.

    q (B, hq, N, dk), k (B, hkv, N, dk), v (B, hkv, N, dv) -> (B, hq, N, dv) in q's dtype (or
    the autocast dtype). `plan`: default `sdpa_plan(...)` for these inputs (tests force one).
    """
    hq, hkv = q.shape[1], k.shape[1]
    gqa = hq != hkv
    if plan is None:
        plan = sdpa_plan(q.device.type, _effective_dtype(q), q.shape[-1], gqa)
    if not torch.compiler.is_compiling():
        _log_once(plan, q, gqa)
    if gqa and plan.expand_kv:
        k = k.repeat_interleave(hq // hkv, dim=1)  # (B, hq, N, dk): query head i reads k/v head i // g
        v = v.repeat_interleave(hq // hkv, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)


def sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                scale: Optional[float] = None, expand_kv: Optional[bool] = None) -> torch.Tensor:
    """SDPA over (B, h, N, d) tensors with grouped-query k/v and a boolean mask, on a fused kernel.

    q (B, hq, N, dk), k (B, hkv, S, dk), v (B, hkv, S, dv), allowed (B or 1, 1, N, S) bool (True:
    attend; every row needs one) -> (B, hq, N, dv). CPU: the fused kernel takes the mask and GQA
    as is. CUDA: flash takes no mask; the memory-efficient kernel takes one but not GQA, so k/v
    are expanded to the query heads and the mask is made additive in the compute dtype.
    `expand_kv`: default True on CUDA (tests force the CUDA form on CPU).
    """
    hq, hkv = q.shape[1], k.shape[1]
    gqa = hq != hkv
    if not (q.device.type == "cuda" if expand_kv is None else expand_kv):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    if gqa:
        k = k.repeat_interleave(hq // hkv, dim=1)  # (B, hq, S, dk): query head i reads k/v head i // g
        v = v.repeat_interleave(hq // hkv, dim=1)
    dtype = _effective_dtype(q)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def _log_once(plan: SdpaPlan, q: torch.Tensor, gqa: bool) -> None:
    key = (plan, q.device.type, _effective_dtype(q), gqa)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    how = "k/v expanded to the query heads" if plan.expand_kv and gqa else ("GQA native" if gqa else "no GQA")
    logger.info("local attention: SDPA %s kernel (%s, %s, %s)",
                plan.kernel, q.device.type, str(_effective_dtype(q)).replace("torch.", ""), how)
