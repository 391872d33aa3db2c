"""Megatron-core `ModuleSpec`s for GPT models whose attention layers are Infini-attention.

    cfg = InfiniTransformerConfig(...)              # or llama_config(...)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_block_infini_spec(cfg), ...,
                     position_embedding_type="rope")

Norm type (RMSNorm / LayerNorm), MLP activation (SwiGLU / GELU) and biases are config
fields (`normalization`, `gated_linear_unit`, `activation_func`, `add_bias_linear`), as in
Megatron; only modules are chosen here.

Which linear layers and norms (`transformer_impl`, "auto" by default):
- "transformer_engine" (auto's choice when `transformer_engine` imports): TE's linear layers,
  the norms fused into the next linear (`TELayerNormColumnParallelLinear`), FP8 when
  `config.fp8` is set. The block spec's final norm and q/k norms stay our `Norm`. With
  `sequence_parallel` each rank's fused norm sees its part of the sequence: the fused norm
  weights' gradients are summed over the tensor-parallel group by a hook
  (`layers.norms.sum_grad_over_tp`), so they are right under any wrapper (DeepSpeed included).
- "local": Megatron's own linear layers and our `Norm` (Apex's fused kernels when importable).
The core attention is Infini-attention either way.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_infini.layers import InfiniCoreAttention, InfiniSelfAttention, Norm

#: memory_type -> (self-attention, core attention) modules of the layer.
_ATTENTION = {"infini": (InfiniSelfAttention, InfiniCoreAttention)}


def _attention_modules(memory_type: str):
    if memory_type in ("compressive", "xl"):
        from megatron_infini.layers.compressive import CompressiveCoreAttention, CompressiveSelfAttention

        core = ModuleSpec(module=CompressiveCoreAttention, params={"memory_type": memory_type})
        return CompressiveSelfAttention, core
    if memory_type not in _ATTENTION:
        raise ValueError(f"memory_type must be one of ('infini', 'compressive', 'xl'), got {memory_type!r}")
    return _ATTENTION[memory_type]

TRANSFORMER_IMPLS = ("auto", "transformer_engine", "local")


def have_transformer_engine() -> bool:
    """True when Transformer Engine and Megatron's TE extension both import."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match this torch/CUDA
        return False
    return True


def choose_transformer_impl(requested: str = "auto", te_available: Optional[bool] = None) -> str:
    """"transformer_engine" or "local" for `requested` (auto | transformer_engine | local).

    auto: Transformer Engine when it imports, else local. `te_available`: default
    `have_transformer_engine()`. Raises ValueError for an unknown value or an explicit
    "transformer_engine" without TE.
    """
    if requested not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got {requested!r}")
    if requested == "local":
        return "local"
    te = have_transformer_engine() if te_available is None else te_available
    if requested == "transformer_engine" and not te:
        raise ValueError("transformer_impl='transformer_engine' but transformer_engine does not import; "
                         "install Transformer Engine or use 'auto' / 'local'")
    return "transformer_engine" if te else "local"


def get_gpt_layer_infini_spec(qk_layernorm: bool = False, memory_type: str = "infini",
                              transformer_impl: str = "auto", fuse_norms: bool = True) -> ModuleSpec:
    """Spec of one transformer layer: Norm -> self-attention with memory -> Norm -> MLP.

    memory_type: "infini" (Infini-attention), "compressive" or "xl" (Compressive Transformer /
    Transformer-XL memories, `megatron_infini.layers.compressive`); must equal the config's
    `memory_type` (`get_gpt_block_infini_spec(config)` takes it from the config).
    qk_layernorm: must equal the config's `qk_layernorm` (the layer refuses a mismatch).

    transformer_impl: see the module docstring; "local" needs neither Apex nor TE.
    fuse_norms (TE only): fold each norm into the next linear layer (TE's
    `TELayerNormColumnParallelLinear`; with sequence parallelism its norm gradients are summed
    over the tensor-parallel group under any wrapper).

    Passed to `GPTModel` as is, Megatron adds its *own* final norm; without TE it would be
    torch's (refuses `sequence_parallel=True`) or Apex's `FusedLayerNorm` (refuses RMSNorm),
    so this call points Megatron's choice at our `Norm` (`compat.ensure_sequence_parallel_final_norm`).
    `get_gpt_block_infini_spec(config)` builds the same model with no such patch.
    """
    if choose_transformer_impl(transformer_impl) == "transformer_engine":
        return _te_layer_spec(qk_layernorm, fuse_norms, memory_type)
    from megatron_infini.compat import ensure_sequence_parallel_final_norm

    ensure_sequence_parallel_final_norm()
    qk_norm = ModuleSpec(module=Norm, params={"per_head": True}) if qk_layernorm else IdentityOp
    self_attention, core_attention = _attention_modules(memory_type)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=self_attention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _te_layer_spec(qk_layernorm: bool, fuse_norms: bool, memory_type: str) -> ModuleSpec:
    """The layer with Transformer Engine's linear layers (imported only here)."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    qk_norm = ModuleSpec(module=Norm, params={"per_head": True}) if qk_layernorm else IdentityOp
    column = _sequence_parallel_norm_linear(TELayerNormColumnParallelLinear) if fuse_norms else TEColumnParallelLinear
    norm = IdentityOp if fuse_norms else Norm
    self_attention, core_attention = _attention_modules(memory_type)
    # Fused norms live in the linear layers; their checkpoint keys are the local spec's, so a
    # checkpoint's weights read the same under either spec.
    keys_map = ({"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
                 "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."} if fuse_norms else {})
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=self_attention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column,
                    core_attention=core_attention,
                    linear_proj=TERowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=TERowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def _sequence_parallel_norm_linear(base: type) -> type:
    """`base` (TE's norm + column-parallel linear) whose norm weights' gradients are summed over
    the tensor-parallel group under sequence parallelism, whatever wraps the model (Megatron's
    DDP does it in `finalize_model_grads`, DeepSpeed does not)."""
    if base not in _NORM_LINEAR:
        from megatron_infini.layers.norms import sum_grad_over_tp

        class SequenceParallelNormLinear(base):
            def __init__(self, *args, config: TransformerConfig, **kwargs):
                super().__init__(*args, config=config, **kwargs)
                if config.sequence_parallel and config.tensor_model_parallel_size > 1:
                    for name in ("layer_norm_weight", "layer_norm_bias"):
                        p = getattr(self, name, None)
                        if isinstance(p, torch.nn.Parameter):
                            sum_grad_over_tp(p, kwargs.get("tp_group"))

        SequenceParallelNormLinear.__name__ = SequenceParallelNormLinear.__qualname__ = "Infini" + base.__name__
        _NORM_LINEAR[base] = SequenceParallelNormLinear
    return _NORM_LINEAR[base]


_NORM_LINEAR: dict = {}


def get_gpt_block_infini_spec(config: TransformerConfig, qk_layernorm: Optional[bool] = None,
                              transformer_impl: str = "auto") -> ModuleSpec:
    """Spec of the whole decoder: `config.num_layers` layers with the memory of
    `config.memory_type` and a final `Norm`.

    Accepted by `GPTModel(transformer_layer_spec=...)` like a layer spec; use it whenever
    `sequence_parallel=True` (works without Apex / Transformer Engine, and the final norm's
    gradient is reduced correctly under any wrapper). With Transformer Engine and sequence
    parallelism too the norms are fused (see the module docstring). With
    `config.memory_free_attention="xl"` the layers without memory are Transformer-XL layers
    (`megatron_infini.layers.compressive`, no compressed memory).
    qk_layernorm: per-head q/k norms; None (default) takes `config.qk_layernorm`, which must
    agree (Megatron reads the config, the spec supplies the norm).
    """
    if qk_layernorm is None:
        qk_layernorm = bool(config.qk_layernorm)
    elif bool(qk_layernorm) != bool(config.qk_layernorm):
        raise ValueError(f"qk_layernorm={qk_layernorm} but config.qk_layernorm={config.qk_layernorm}: "
                         "they must agree (leave qk_layernorm unset to take the config's)")
    def layer(memory_type: str) -> ModuleSpec:
        return get_gpt_layer_infini_spec(qk_layernorm=qk_layernorm, memory_type=memory_type,
                                         transformer_impl=transformer_impl)

    main = layer(getattr(config, "memory_type", "infini"))
    if getattr(config, "memory_free_attention", "segment") != "xl":
        layer_specs = [main] * config.num_layers
    else:  # the layers without memory: Transformer-XL
        xl = layer("xl")
        layer_specs = [xl if config.memory_free_xl(i) else main for i in range(1, config.num_layers + 1)]
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=Norm),
    )
