"""Shared pieces of the Infini-attention ops: input checks, sigma, empty memory.

Shape legend (Megatron order, sequence first):
    s   sequence length          b   batch
    hq  query heads              hkv key/value heads (hq % hkv == 0), g = hq // hkv
    dk  query/key head dim       dv  value head dim
    M   memory matrix  [b, hkv, dk, dv] float32
    z   normaliser     [b, hkv, dk]     float32
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

#: Added to the retrieval denominators so that an empty memory (M = 0, z = 0)
#: retrieves exactly zero instead of 0/0.
EPS = 1e-6

UPDATE_RULES = ("linear", "delta")

Memory = Tuple[torch.Tensor, torch.Tensor]


class Dims(NamedTuple):
    s: int
    b: int
    hq: int
    hkv: int
    dk: int
    dv: int


def autocast_off(fn):
    """Run `fn` with autocast off on the device type of its first tensor argument, and its
    float32 matmuls in full float32 (`ieee_fp32_matmuls`).

    For the memory path (and the autograd functions' forwards and backwards): under
    `torch.autocast(dtype=torch.bfloat16)` its matmuls would otherwise run in bf16 and the
    float32 memory state would drift (~3e-3 relative after 8K tokens); under TF32 (NGC images
    set `TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1`) or `torch.set_float32_matmul_precision("medium")`
    (bf16 on CPUs with oneDNN bf16) they would lose the same precision. The local softmax
    attention stays outside, so it still runs in the autocast dtype.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = "cpu"
        for a in args:
            if isinstance(a, torch.Tensor):
                device = a.device.type
                break
        with torch.autocast(device_type=device, enabled=False), ieee_fp32_matmuls():
            return fn(*args, **kwargs)

    return wrapper


#: The per-backend float32 matmul settings that `torch.set_float32_matmul_precision` changes.
_MATMUL_BACKENDS = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)


@contextlib.contextmanager
def ieee_fp32_matmuls():
    """float32 matmuls in full float32 inside the block ("highest": no TF32 on CUDA, no bf16
    on CPU), whatever the global settings (`torch.set_float32_matmul_precision`,
    `torch.backends.cuda.matmul.allow_tf32`, the backends' `fp32_precision`, or the
    `TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1` default); they are restored on exit.

    Uses the legacy setter, which keeps torch's legacy and per-backend flags consistent (a
    mix makes CUDA matmuls raise). Under torch.compile (dynamo cannot trace the settings) it
    does nothing: a compiled graph's matmuls follow the settings in force where it runs.
    """
    if torch.compiler.is_compiling():
        yield
        return
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # legacy and per-backend settings were mixed: only the latter restore
        legacy = None
    per_backend = [b.fp32_precision for b in _MATMUL_BACKENDS]
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for backend, value in zip(_MATMUL_BACKENDS, per_backend):
            if backend.fp32_precision != value:
                backend.fp32_precision = value


def sigma(x: torch.Tensor) -> torch.Tensor:
    """ELU + 1 in float32: the positive feature map of the memory path."""
    return F.elu(x.float()) + 1.0


def empty_memory(b: int, hkv: int, dk: int, dv: int, device=None) -> Memory:
    """M_0 = 0 [b, hkv, dk, dv] and z_0 = 0 [b, hkv, dk], both float32."""
    return (
        torch.zeros(b, hkv, dk, dv, dtype=torch.float32, device=device),
        torch.zeros(b, hkv, dk, dtype=torch.float32, device=device),
    )


def pack_memory(M: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(M [b, h, dk, dv], z [b, h, dk]) -> Mz = [M | z] [b, h, dk, dv + 1] float32: one tensor,
    for one matmul reading retrieval and normaliser, or one message between ranks."""
    return torch.cat([M, z.unsqueeze(-1)], dim=-1).contiguous()


def unpack_memory(packed: torch.Tensor) -> Memory:
    """Inverse of `pack_memory` (views, no copy)."""
    return packed[..., :-1], packed[..., -1]


def check_write(write: Optional[torch.Tensor], s: int, b: int, hkv: int) -> None:
    """The optional write strengths must be a float tensor [s, b, hkv]."""
    if write is not None and (not isinstance(write, torch.Tensor) or write.shape != (s, b, hkv)
                              or not write.is_floating_point()):
        got = _shape(write) if isinstance(write, torch.Tensor) else type(write).__name__
        raise ValueError(f"write must be a float tensor [s={s}, b={b}, hkv={hkv}] (one strength per token and "
                         f"key/value head), got {got}")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    segment_length: int,
    update: str,
    memory: Optional[Memory],
    q_local: Optional[torch.Tensor],
    k_local: Optional[torch.Tensor],
) -> Dims:
    """Validate the op's arguments; raise ValueError naming the bad one."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [s, b, heads, head_dim], got {got}")
    s, b, hq, dk = q.shape
    if k.shape[:2] != (s, b) or k.shape[3] != dk:
        raise ValueError(f"k must be [s={s}, b={b}, hkv, dk={dk}] to match q {_shape(q)}, got {_shape(k)}")
    hkv = k.shape[2]
    if v.shape[:3] != (s, b, hkv):
        raise ValueError(f"v must be [s={s}, b={b}, hkv={hkv}, dv] to match k {_shape(k)}, got {_shape(v)}")
    dv = v.shape[3]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) for grouped-query attention")
    if s < 1:
        raise ValueError(f"q must hold at least one position, got sequence length {s}")
    if not isinstance(gate, torch.Tensor) or gate.shape != (hq,):
        got = _shape(gate) if isinstance(gate, torch.Tensor) else type(gate).__name__
        raise ValueError(f"gate must be a tensor of shape [hq={hq}] (one logit per query head), got {got}")
    if isinstance(segment_length, bool) or not isinstance(segment_length, int) or segment_length < 1:
        raise ValueError(f"segment_length must be an integer >= 1, got {segment_length!r}")
    if update not in UPDATE_RULES:
        raise ValueError(f"update must be one of {UPDATE_RULES}, got {update!r}")
    for name, t, ref in (("q_local", q_local, q), ("k_local", k_local, k)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != ref.shape):
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have the shape of {name[0]} {_shape(ref)}, got {got}")
    if memory is not None:
        if not isinstance(memory, (tuple, list)) or len(memory) != 2:
            raise ValueError("memory must be None or a tuple (M, z)")
        M, z = memory
        if not isinstance(M, torch.Tensor) or M.shape != (b, hkv, dk, dv):
            got = _shape(M) if isinstance(M, torch.Tensor) else type(M).__name__
            raise ValueError(f"memory M must be [b={b}, hkv={hkv}, dk={dk}, dv={dv}], got {got}")
        if not isinstance(z, torch.Tensor) or z.shape != (b, hkv, dk):
            got = _shape(z) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"memory z must be [b={b}, hkv={hkv}, dk={dk}], got {got}")
        if M.dtype != torch.float32 or z.dtype != torch.float32:
            raise ValueError(f"memory (M, z) must be float32, got {M.dtype} and {z.dtype}")
    return Dims(s, b, hq, hkv, dk, dv)
