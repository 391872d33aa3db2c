"""Which of Megatron's fused kernels a run uses (`TransformerConfig` fields), from the device
and whether Transformer Engine imports.

    cfg = llama_config(**fusion_fields(), num_layers=..., ...)

On CUDA ("auto"):
- `bias_activation_fusion`: the MLP's bias + SwiGLU / GeLU in one fused function (for GeLU
  without gating only with biases, as Megatron requires);
- `bias_dropout_fusion`: the residual's bias + dropout + add fused;
- `apply_rope_fusion`: Transformer Engine's fused RoPE (Megatron refuses it without TE); the
  Infini layers' in-segment RoPE goes through the same `apply_rotary_pos_emb`;
- `cross_entropy_loss_fusion` (Megatron's "native" kernel): the LM loss when the chunked loss
  (`model.loss_chunk_tokens`) is off.
Not set: `masked_softmax_fusion` (used by Megatron's `DotProductAttention`, which the Infini
layers replace: their local attention is SDPA), `gradient_accumulation_fusion` (needs Megatron's
DDP `main_grad`; the trainer uses DeepSpeed), `persist_layer_norm` (Apex's norm; our `Norm`).
On CPU, or with "off", all are False: Megatron's fused functions are compiled for CUDA (or
JIT-compiled with torch.compile on first use).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

FUSIONS = ("auto", "off")

#: The TransformerConfig fields set here.
FUSION_FIELDS = ("bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion", "masked_softmax_fusion",
                 "cross_entropy_loss_fusion")


def fusion_fields(
    fusions: str = "auto",
    *,
    activation_func: Callable = F.silu,
    gated_linear_unit: bool = True,
    add_bias_linear: bool = False,
    cuda: Optional[bool] = None,
    transformer_engine: Optional[bool] = None,
) -> Dict[str, Any]:
    """TransformerConfig fields for Megatron's fusions (FUSION_FIELDS) of a model with this MLP.

    fusions: "auto" (what applies on this device) or "off". cuda: default
    `torch.cuda.is_available()`; transformer_engine: default whether it imports. Raises
    ValueError for another value of `fusions`.
    """
    if fusions not in FUSIONS:
        raise ValueError(f"fusions must be one of {FUSIONS}, got {fusions!r}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    on = fusions == "auto" and cuda
    if transformer_engine is None:
        from megatron_infini.spec import have_transformer_engine

        transformer_engine = on and have_transformer_engine()
    # Megatron: fused SwiGLU / GeGLU, or GeLU with a bias to fuse
    activation = activation_func in (F.silu, F.gelu) and (gated_linear_unit or activation_func is F.gelu)
    activation = activation and (gated_linear_unit or add_bias_linear)
    return dict(
        bias_activation_fusion=on and activation,
        bias_dropout_fusion=on,
        apply_rope_fusion=on and bool(transformer_engine),
        masked_softmax_fusion=False,
        cross_entropy_loss_fusion=on,
    )
