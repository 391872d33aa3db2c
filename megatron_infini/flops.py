"""FLOP counts, Megatron's model-FLOPs convention: matmuls only, 2 FLOPs per multiply-add,
backward = 2 x forward (so one training step = 3 x forward). Causal attention counts only the
unmasked half of the score matrix.
"""

from __future__ import annotations


def causal_attention_flops(s: int, b: int, hq: int, dk: int, dv: int, segment_length: int = 0) -> float:
    """Forward FLOPs of causal softmax attention, within segments of `segment_length` (0: whole s)."""
    N = segment_length if 0 < segment_length < s else s
    full, rest = divmod(s, N)
    pairs = full * N * (N + 1) / 2 + rest * (rest + 1) / 2  # unmasked (query, key) pairs
    return 2.0 * b * hq * pairs * (dk + dv)


def memory_flops(s: int, b: int, hq: int, hkv: int, dk: int, dv: int, update: str = "linear") -> float:
    """Forward FLOPs of the compressive memory: retrieval for every query and the update."""
    retrieve = 2.0 * b * hq * s * dk * (dv + 1)  # sigma(Q) M and sigma(Q) z
    write = 2.0 * b * hkv * s * dk * dv  # sigma(K)^T V (or its delta)
    if update == "delta":
        write += 2.0 * b * hkv * s * dk * (dv + 1)  # sigma(K) M / sigma(K) z before writing
    return retrieve + write


def infini_attention_flops(
    s: int, b: int, hq: int, hkv: int, dk: int, dv: int, segment_length: int, update: str = "linear"
) -> float:
    """Forward FLOPs of one Infini-attention call (local attention + memory read and write)."""
    return causal_attention_flops(s, b, hq, dk, dv, segment_length) + memory_flops(s, b, hq, hkv, dk, dv, update)
