"""Build the Megatron-core GPTModel with Infini-attention from the trainer's config."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Config, ModelConfig


def padded_vocab_size(vocab: int, tp: int, multiple: int = 128) -> int:
    """Megatron pads the vocabulary so every tensor-parallel shard is a multiple of 128."""
    step = multiple * tp
    return -(-vocab // step) * step


def ffn_size(m: ModelConfig) -> int:
    if m.ffn_hidden_size:
        return m.ffn_hidden_size
    if m.activation == "swiglu":  # Llama: 2/3 of 4h, rounded up to a multiple of 64
        return -(-int(8 * m.hidden_size / 3) // 64) * 64
    return 4 * m.hidden_size


def transformer_config(cfg: Config, bf16: bool):
    """The `InfiniTransformerConfig` for this run (Megatron field names)."""
    from megatron_infini.config import InfiniTransformerConfig
    from megatron_infini.fusions import fusion_fields

    m, p = cfg.model, cfg.parallel
    recompute = (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if m.recompute_layers else {}
    )
    return InfiniTransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=ffn_size(m),
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        segment_length=m.segment_length,
        memory_update=m.memory_update,
        memory_enabled=m.memory_enabled,
        memory_layers=None if m.memory_layers is None else tuple(m.memory_layers),
        memory_type=m.memory_type,
        memory_free_attention=m.memory_free_attention,
        xl_memory_length=m.xl_memory_length,
        compressed_memory_length=m.compressed_memory_length,
        compression_rate=m.compression_rate,
        reconstruction_loss_weight=m.reconstruction_loss_weight,
        memory_write_gate=m.memory_write_gate,
        memory_write_init=m.memory_write_init,
        memory_write_l1=m.memory_write_l1,
        memory_repeat_max=m.memory_repeat_max,
        gate_init=m.gate_init,
        checkpoint_segments=m.checkpoint_segments,
        normalization=m.normalization,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=1e-5,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(),
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        **({"fp8": m.fp8} if m.fp8 else {}),
        **fusion_fields(m.fusions, activation_func=F.silu if m.activation == "swiglu" else F.gelu,
                        gated_linear_unit=m.activation == "swiglu", add_bias_linear=False),
        **recompute,
    )


def build_model(cfg: Config, vocab_size: int, bf16: bool = False):
    """GPTModel (Llama-style by default) whose every attention layer is Infini-attention."""
    from megatron.core.models.gpt import GPTModel

    from megatron_infini.spec import get_gpt_block_infini_spec

    config = transformer_config(cfg, bf16)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_block_infini_spec(config, transformer_impl=cfg.model.transformer_impl),
        vocab_size=vocab_size,
        max_sequence_length=cfg.train.seq_length,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings,
    )
    if cfg.model.rope_scaling:  # Llama 3.x; Megatron's own rope_scaling fixes 3 of the 4 parameters
        from megatron_infini.rope import apply_llama3_rope_scaling

        m = cfg.model
        apply_llama3_rope_scaling(model, m.rope_scaling_factor, m.rope_scaling_low_freq_factor,
                                  m.rope_scaling_high_freq_factor, m.rope_scaling_original_max_position)
    if config.context_parallel_size > 1:  # RoPE table unsliced: in-segment positions on every rank
        from megatron_infini.parallel import setup_context_parallel

        setup_context_parallel(model)
    if cfg.model.loss_chunk_tokens:
        from megatron_infini.layers.lm_loss import enable_chunked_lm_loss

        enable_chunked_lm_loss(model, cfg.model.loss_chunk_tokens)
    if torch.cuda.is_available():
        model.cuda()
    if cfg.train.compile:
        compile_layers(model)
    return model


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """torch.compile every transformer layer in place (`nn.Module.compile`: parameter names and
    checkpoints unchanged). The Infini op traces without graph breaks; Megatron's modules may
    add some. Returns the number of layers compiled."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
