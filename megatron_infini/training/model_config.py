"""`ModelConfig`: the model section of the trainer's config (`model.*` keys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .config_checks import ConfigError, _at_least, _one_of


@dataclass
class ModelConfig:
    """Shape of the Llama-style Infini-attention GPT model."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: Optional[int] = None
    """MLP width; default: 4 * hidden_size (GELU) or Llama's 8/3 * hidden_size rounded up to 64 (SwiGLU)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads (grouped-query attention); default: num_attention_heads."""
    vocab_size: Optional[int] = None
    """Vocabulary size; default: the tokenizer's, padded up to a multiple of 128 x TP."""
    segment_length: int = 64
    """Infini-attention segment length N: local attention sees N tokens, the memory the rest."""
    memory_update: str = "linear"
    """Memory update rule: linear | delta."""
    memory_enabled: bool = True
    """False: plain segment-local attention, no memory (the ablation)."""
    memory_layers: Optional[List[int]] = None
    """Layers (1-based) whose attention keeps a memory; the others attend within their segment
    only. null: every layer (the paper). See docs/generalisation.md."""
    memory_free_attention: str = "segment"
    """Attention of the layers without memory (memory_layers): segment (within the segment, the
    paper) | xl (also the xl_memory_length tokens before the segment, Transformer-XL style, so
    no token's view depends on where a segment boundary falls). See docs/generalisation.md."""
    memory_type: str = "infini"
    """infini | compressive (Compressive Transformer) | xl (Transformer-XL); see docs/memories.md."""
    xl_memory_length: Optional[int] = None
    """compressive / xl: past tokens kept as keys and values per layer; default: segment_length."""
    compressed_memory_length: Optional[int] = None
    """compressive: compressed slots per layer; default: xl_memory_length."""
    compression_rate: int = 2
    """compressive: evicted tokens per compressed slot (must divide segment_length and xl_memory_length)."""
    reconstruction_loss_weight: float = 1.0
    """compressive: weight of the attention-reconstruction loss (trains only the compressor)."""
    memory_write_gate: str = "none"
    """Learned per-token write strengths of the memory: none (the paper) | hard
    (clamp(u . k_t + c, 0, 1): skipped tokens never accumulate) | sigmoid; both start equal to
    the paper's layer (docs/generalisation.md)."""
    memory_write_init: float = 0.5
    """Initial write strength with memory_write_gate, in (0, 1) (any constant: the paper's output)."""
    memory_write_l1: float = 0.0
    """Weight of an L1 penalty on the write strengths (mean over tokens and heads, summed over
    memory layers) added to the training loss; needs memory_write_gate (docs/generalisation.md)."""
    memory_write_l1_start: int = 0
    """First training step at which memory_write_l1 is added to the loss (0: from the start). The
    penalty stops a model still on its loss plateau from finding retrieval (docs/generalisation.md)."""
    memory_repeat_max: int = 1
    """Training augmentation: each segment is written to the memory as if repeated m times, m
    in 1..R drawn per segment (1: off). Linear update only (docs/generalisation.md)."""
    memory_repeat_start: int = 0
    """First training step of the memory_repeat_max augmentation (0: from the start)."""
    gate_init: float = 0.0
    """Initial gate logit beta (sigmoid(0) = 0.5 mixes memory and local attention evenly)."""
    checkpoint_segments: int = 0
    """Activation checkpointing inside attention in blocks of this many segments; 0 = off."""
    normalization: str = "RMSNorm"
    """RMSNorm | LayerNorm."""
    activation: str = "swiglu"
    """swiglu (Llama) | gelu."""
    rotary_base: int = 10000
    """RoPE base (Llama 3 uses 500000)."""
    rope_scaling: bool = False
    """Llama 3.1 / 3.2 RoPE frequency scaling (Hugging Face rope_type "llama3"), with the factors below."""
    rope_scaling_factor: float = 8.0
    """Llama 3 scaling: long wavelengths are stretched by this (Llama 3.1: 8, Llama 3.2: 32)."""
    rope_scaling_low_freq_factor: float = 1.0
    """Llama 3 scaling: wavelengths longer than original_max_position / this are fully stretched."""
    rope_scaling_high_freq_factor: float = 4.0
    """Llama 3 scaling: wavelengths shorter than original_max_position / this are unchanged."""
    rope_scaling_original_max_position: int = 8192
    """Llama 3 scaling: the context length the unscaled model was trained on."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation."""
    untie_embeddings: bool = True
    """Separate input embedding and output layer (Llama)."""
    recompute_layers: bool = False
    """Full activation recomputation of every transformer layer."""
    loss_chunk_tokens: int = 0
    """0: Megatron's output layer and loss (float32 logits of every token: at 32K tokens x 128K
    vocab ~16 GB per sample). k > 0: the LM head and its cross-entropy run in chunks of k tokens,
    logits recomputed in backward (`megatron_infini.layers.lm_loss`): the same loss and
    gradients with O(k x vocab) extra memory; 4096 suits long sequences."""
    transformer_impl: str = "auto"
    """auto (Transformer Engine's linear layers with fused norms when `transformer_engine` imports,
    else Megatron's local layers) | transformer_engine | local. See `megatron_infini.spec`."""
    fusions: str = "auto"
    """auto (on CUDA, Megatron's fused kernels that apply: bias + activation, bias + dropout +
    add, RoPE with Transformer Engine, cross-entropy; none on CPU) | off. See
    `megatron_infini.fusions`."""
    fp8: Optional[str] = None
    """FP8 linear layers (Transformer Engine only, Hopper or newer): null | hybrid | e4m3."""

    def validate(self, prefix: str = "model") -> None:
        for key in ("num_layers", "hidden_size", "num_attention_heads", "segment_length"):
            _at_least(f"{prefix}.{key}", getattr(self, key), 1)
        _one_of(f"{prefix}.memory_update", self.memory_update, ("linear", "delta"))
        _one_of(f"{prefix}.memory_type", self.memory_type, ("infini", "compressive", "xl"))
        if self.memory_type != "infini":
            self._validate_past_memory(prefix)  # (InfiniTransformerConfig checks them again)
        _one_of(f"{prefix}.memory_free_attention", self.memory_free_attention, ("segment", "xl"))
        if self.memory_free_attention == "xl":
            if self.memory_type != "infini" or (self.memory_enabled and self.memory_layers is None):
                raise ConfigError(f"{prefix}.memory_free_attention=xl applies to the layers without memory of "
                                  f"{prefix}.memory_type=infini: set {prefix}.memory_layers (e.g. [{self.num_layers}])")
            _at_least(f"{prefix}.xl_memory_length",
                      self.segment_length if self.xl_memory_length is None else self.xl_memory_length, 1)
        _one_of(f"{prefix}.memory_write_gate", self.memory_write_gate, ("none", "hard", "sigmoid"))
        _at_least(f"{prefix}.memory_write_l1", self.memory_write_l1, 0)
        _at_least(f"{prefix}.loss_chunk_tokens", self.loss_chunk_tokens, 0)
        _at_least(f"{prefix}.memory_write_l1_start", self.memory_write_l1_start, 0)
        _at_least(f"{prefix}.memory_repeat_max", self.memory_repeat_max, 1)
        _at_least(f"{prefix}.memory_repeat_start", self.memory_repeat_start, 0)
        if self.memory_repeat_max > 1 and (self.memory_update != "linear" or self.memory_type != "infini"):
            raise ConfigError(f"{prefix}.memory_repeat_max > 1 simulates repeated segments in the Infini memory with "
                              f"the linear update: needs {prefix}.memory_update=linear and {prefix}.memory_type=infini")
        if self.memory_write_l1 and self.memory_write_gate == "none":
            raise ConfigError(f"{prefix}.memory_write_l1 needs learned write strengths: set {prefix}.memory_write_gate "
                              "to hard or sigmoid")
        if self.memory_write_l1 and self.recompute_layers:
            raise ConfigError(f"{prefix}.memory_write_l1 > 0 with {prefix}.recompute_layers=true: the recomputed layers run "
                              "their forward without autograd, so the penalty would get no gradient; bound activation "
                              f"memory with {prefix}.checkpoint_segments instead")
        layers = self.memory_layers
        if layers is not None and (not isinstance(layers, (list, tuple)) or not layers
                                   or any(isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= self.num_layers
                                          for x in layers) or len(set(layers)) != len(layers)):
            raise ConfigError(f"{prefix}.memory_layers must be null or a list of distinct layer numbers in "
                              f"1..{prefix}.num_layers ({self.num_layers}), e.g. [{self.num_layers}], got {layers!r}")
        _one_of(f"{prefix}.normalization", self.normalization, ("RMSNorm", "LayerNorm"))
        _one_of(f"{prefix}.activation", self.activation, ("swiglu", "gelu"))
        _at_least(f"{prefix}.checkpoint_segments", self.checkpoint_segments, 0)
        if self.rope_scaling:
            from megatron_infini.rope import check_llama3_scaling

            try:
                check_llama3_scaling(self.rope_scaling_factor, self.rope_scaling_low_freq_factor,
                                     self.rope_scaling_high_freq_factor, self.rope_scaling_original_max_position,
                                     prefix=f"{prefix}.rope_scaling")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        _one_of(f"{prefix}.transformer_impl", self.transformer_impl, ("auto", "transformer_engine", "local"))
        _one_of(f"{prefix}.fp8", self.fp8, (None, "hybrid", "e4m3"))
        _one_of(f"{prefix}.fusions", self.fusions, ("auto", "off"))
        if self.fp8 and self.transformer_impl == "local":
            raise ConfigError(f"{prefix}.fp8 needs Transformer Engine: set {prefix}.transformer_impl to auto or transformer_engine")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{prefix}.hidden_size ({self.hidden_size}) must be divisible by "
                f"{prefix}.num_attention_heads ({self.num_attention_heads})"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ConfigError(
                f"{prefix}.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"{prefix}.num_query_groups ({groups})"
            )

    def _validate_past_memory(self, prefix: str) -> None:
        t, c, n_cm = self.memory_type, self.compression_rate, self.compressed_memory_length
        n_m = self.segment_length if self.xl_memory_length is None else self.xl_memory_length
        _at_least(f"{prefix}.xl_memory_length", n_m, 1)
        if t == "compressive":
            _at_least(f"{prefix}.compression_rate", c, 1)
            _at_least(f"{prefix}.compressed_memory_length", 1 if n_cm is None else n_cm, 1)
            if n_m % c or self.segment_length % c:
                raise ConfigError(f"{prefix}.xl_memory_length ({n_m}) and {prefix}.segment_length "
                                  f"({self.segment_length}) must be multiples of {prefix}.compression_rate ({c})")
        _at_least(f"{prefix}.reconstruction_loss_weight", self.reconstruction_loss_weight, 0)
        for key, bad in dict(memory_enabled=not self.memory_enabled, memory_layers=self.memory_layers is not None,
                             checkpoint_segments=self.checkpoint_segments,
                             recompute_layers=self.recompute_layers).items():
            if bad:
                raise ConfigError(f"{prefix}.{key} is not supported with {prefix}.memory_type={t!r}; leave the default")
