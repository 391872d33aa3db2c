"""FLOP counts, Megatron's model-FLOPs convention: matmuls only, 2 FLOPs per multiply-add,
backward = 2 x forward (so one training step = 3 x forward). Causal attention counts only the
unmasked half of the score matrix.
"""

from __future__ import annotations

from typing import Optional


def causal_attention_flops(s: int, b: int, hq: int, dk: int, dv: int, segment_length: int = 0) -> float:
    """Forward FLOPs of causal softmax attention, within segments of `segment_length` (0: whole s)."""
    N = segment_length if 0 < segment_length < s else s
    full, rest = divmod(s, N)
    pairs = full * N * (N + 1) / 2 + rest * (rest + 1) / 2  # unmasked (query, key) pairs
    return 2.0 * b * hq * pairs * (dk + dv)


def window_attention_flops(s: int, b: int, hq: int, dk: int, dv: int, segment_length: int, window: int) -> float:
    """Forward FLOPs of Transformer-XL attention (`memory_free_attention="xl"`): causal within
    each segment plus, for every query, the `window` keys before its segment (fewer at the start)."""
    N = segment_length if 0 < segment_length < s else s
    extra = sum(min(N, s - start) * min(window, start) for start in range(0, s, N))  # (query, past key) pairs
    return causal_attention_flops(s, b, hq, dk, dv, N) + 2.0 * b * hq * extra * (dk + dv)


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


def gpt_model_flops_per_step(
    *, num_layers: int, hidden_size: int, ffn_hidden_size: int, num_attention_heads: int,
    num_query_groups: int, vocab_size: int, seq_length: int, batch: int, segment_length: int,
    update: str = "linear", gated_mlp: bool = True, memory_enabled: bool = True,
    memory_layers: Optional[int] = None, memory_free_window: int = 0,
) -> float:
    """Model FLOPs of one training step (forward + backward, no recomputation) of the
    Infini-attention GPT model over `batch` sequences of `seq_length` tokens; `memory_layers`:
    how many layers keep a memory (default: all of them when `memory_enabled`);
    `memory_free_window`: the others' Transformer-XL window (0: attention within the segment)."""
    s, b, h = seq_length, batch, hidden_size
    d = h // num_attention_heads
    tokens = s * b
    qkv = 2.0 * tokens * h * (num_attention_heads + 2 * num_query_groups) * d
    proj = 2.0 * tokens * num_attention_heads * d * h
    mlp = 2.0 * tokens * h * ffn_hidden_size * (3 if gated_mlp else 2)
    n_mem = (num_layers if memory_layers is None else memory_layers) if memory_enabled else 0
    local = window_attention_flops(s, b, num_attention_heads, d, d, segment_length, memory_free_window)
    infini = infini_attention_flops(s, b, num_attention_heads, num_query_groups, d, d, segment_length, update)
    attn = n_mem * infini + (num_layers - n_mem) * local
    logits = 2.0 * tokens * h * vocab_size
    return 3.0 * (num_layers * (qkv + proj + mlp) + attn + logits)
