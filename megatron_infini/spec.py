"""Megatron-core `ModuleSpec`s for GPT models whose attention layers are Infini-attention.

    cfg = InfiniTransformerConfig(...)              # or llama_config(...)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_block_infini_spec(cfg), ...,
                     position_embedding_type="rope")

Norm type (RMSNorm / LayerNorm), MLP activation (SwiGLU / GELU) and biases are config
fields (`normalization`, `gated_linear_unit`, `activation_func`, `add_bias_linear`), as in
Megatron; only modules are chosen here.
"""

from __future__ import annotations

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

        return CompressiveSelfAttention, CompressiveCoreAttention
    if memory_type not in _ATTENTION:
        raise ValueError(f"memory_type must be one of ('infini', 'compressive', 'xl'), got {memory_type!r}")
    return _ATTENTION[memory_type]


def get_gpt_layer_infini_spec(qk_layernorm: bool = False, memory_type: str = "infini") -> ModuleSpec:
    """Spec of one transformer layer: Norm -> self-attention with memory -> Norm -> MLP.

    memory_type: "infini" (Infini-attention), "compressive" or "xl" (Compressive Transformer /
    Transformer-XL memories, `megatron_infini.layers.compressive`); must equal the config's
    `memory_type` (`get_gpt_block_infini_spec(config)` takes it from the config).

    Megatron modules only (no Apex / Transformer Engine needed), tensor- and
    sequence-parallel. Passed to `GPTModel` as is, Megatron adds its *own* final norm; without
    Apex/TE that norm refuses `sequence_parallel=True`, so this call points Megatron's fallback
    at our `Norm` (see `compat.ensure_sequence_parallel_final_norm`).
    `get_gpt_block_infini_spec(config)` builds the same model with no such patch.
    """
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


def get_gpt_block_infini_spec(config: TransformerConfig, qk_layernorm: bool = False) -> ModuleSpec:
    """Spec of the whole decoder: `config.num_layers` layers with the memory of
    `config.memory_type` and a final `Norm`.

    Accepted by `GPTModel(transformer_layer_spec=...)` like a layer spec; use it whenever
    `sequence_parallel=True` (works without Apex / Transformer Engine, and the final norm's
    gradient is reduced correctly under any wrapper).
    """
    layer = get_gpt_layer_infini_spec(qk_layernorm=qk_layernorm,
                                      memory_type=getattr(config, "memory_type", "infini"))
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=Norm),
    )
