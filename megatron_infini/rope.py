"""Llama 3 RoPE frequency scaling ("rope_type": "llama3" in Hugging Face configs).

Llama 3.1 and 3.2 stretch the long rotary wavelengths so that a model trained on 8K positions
reads 128K: with `ratio = original_max_position / wavelength` (how many periods of a frequency
fit into the original context),

    ratio <= low_freq_factor                 frequency / factor        (long waves: stretched)
    ratio >= high_freq_factor                frequency                 (short waves: unchanged)
    in between, with s = (ratio - low) / (high - low):
                                             frequency * (s + (1 - s) / factor)

Megatron-core's `rope_scaling=True` applies this with the Llama 3.1 constants (low 1, high 4,
original 8192) and a configurable factor; `apply_llama3_rope_scaling` takes all four, so any
Llama 3.x config.json is reproduced. Infini-attention rotates with in-segment positions, so
the scaled table only ever serves positions 0..segment_length-1 (docs/infini.md).
"""

from __future__ import annotations

import math

import torch


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float = 1.0,
                    high_freq_factor: float = 4.0, original_max_position: int = 8192) -> torch.Tensor:
    """Scaled inverse frequencies [d/2] from the unscaled ones [d/2] (same dtype and device).

    Raises:
        ValueError: factor <= 0, low_freq_factor <= 0, high_freq_factor <= low_freq_factor or
            original_max_position < 1.
    """
    check_llama3_scaling(factor, low_freq_factor, high_freq_factor, original_max_position)
    ratio = original_max_position * inv_freq / (2 * math.pi)  # original context / wavelength
    s = ((ratio - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)
    return inv_freq * (s + (1.0 - s) / factor)


def check_llama3_scaling(factor: float, low_freq_factor: float, high_freq_factor: float,
                         original_max_position: int, prefix: str = "rope_scaling") -> None:
    """ValueError naming the field when the Llama 3 scaling parameters are out of range."""
    if not factor > 0:
        raise ValueError(f"{prefix}_factor must be > 0, got {factor}")
    if not 0 < low_freq_factor < high_freq_factor:
        raise ValueError(f"{prefix}_low_freq_factor ({low_freq_factor}) must be > 0 and < "
                         f"{prefix}_high_freq_factor ({high_freq_factor})")
    if original_max_position < 1:
        raise ValueError(f"{prefix}_original_max_position must be >= 1, got {original_max_position}")


def apply_llama3_rope_scaling(model: torch.nn.Module, factor: float, low_freq_factor: float = 1.0,
                              high_freq_factor: float = 4.0, original_max_position: int = 8192) -> None:
    """Scales the rotary table of a Megatron `GPTModel` built with `position_embedding_type="rope"`
    and without Megatron's own `rope_scaling`. Call it once, right after building the model
    (before the first forward pass, whose table Megatron caches).

    Raises:
        ValueError: the model has no rotary embedding, was already scaled, or bad parameters.
    """
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ValueError("apply_llama3_rope_scaling needs a GPTModel with position_embedding_type='rope'")
    if getattr(rotary, "llama3_scaled", False) or getattr(model, "rotary_scaling", False):
        raise ValueError("the model's RoPE is already scaled (apply_llama3_rope_scaling or rope_scaling=True)")
    rotary.inv_freq = llama3_inv_freq(rotary.inv_freq, factor, low_freq_factor, high_freq_factor,
                                      original_max_position)
    rotary.llama3_scaled = True
