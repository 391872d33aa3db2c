"""Configuration of an Infini-attention Llama exported by megatron-infini (`model_type` "infini_llama").

Copied into every model directory that `tools/convert_checkpoint.py to-hf` writes; loaded by
`AutoConfig.from_pretrained(DIR, trust_remote_code=True)`. Needs transformers only.
"""

from __future__ import annotations

from transformers import PretrainedConfig

#: Advertised context length. The model reads inputs of any length with constant memory (the
#: local attention never sees a position beyond segment_length; earlier segments live in the
#: fixed-size memory), but outside tools (lm-evaluation-harness, pipelines) read
#: max_position_embeddings / the tokenizer's model_max_length and truncate inputs to it, so
#: both are set this large rather than to a training length.
UNBOUNDED_LENGTH = 2 ** 30

MEMORY_UPDATES = ("linear", "delta")
WRITE_GATES = ("none", "hard", "sigmoid")


class InfiniLlamaConfig(PretrainedConfig):
    """A Llama (RMSNorm, SwiGLU, RoPE, grouped-query attention) whose attention is
    Infini-attention (Munkhdalai et al. 2024, arXiv 2404.07143).

    Infini fields:
        segment_length: N, tokens per segment; local attention stays inside a segment with
            RoPE positions 0..N-1, the memory carries everything before it.
        memory_update: "linear" or "delta".
        memory_enabled: False: every layer is segment-local attention only (no memory).
        memory_layers: 1-based layer numbers that keep a memory (None: every layer); the
            others are segment-local attention only.
        memory_write_gate: "none" | "hard" | "sigmoid": learned per-token write strengths.
        llama3_rope_scaling: None, or {"factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"} (Llama 3.x frequency scaling).
    """

    model_type = "infini_llama"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, head_dim=None, rms_norm_eps=1e-5,
                 rope_theta=10000.0, llama3_rope_scaling=None, max_position_embeddings=UNBOUNDED_LENGTH,
                 initializer_range=0.02, use_cache=True, tie_word_embeddings=False, segment_length=2048,
                 memory_update="linear", memory_enabled=True, memory_layers=None, memory_write_gate="none",
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        self.llama3_rope_scaling = llama3_rope_scaling
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.segment_length = int(segment_length)
        self.memory_update = memory_update
        self.memory_enabled = bool(memory_enabled)
        self.memory_layers = None if memory_layers is None else sorted(int(x) for x in memory_layers)
        self.memory_write_gate = memory_write_gate
        if self.segment_length < 1:
            raise ValueError(f"segment_length must be >= 1, got {segment_length}")
        if memory_update not in MEMORY_UPDATES:
            raise ValueError(f"memory_update must be one of {MEMORY_UPDATES}, got {memory_update!r}")
        if memory_write_gate not in WRITE_GATES:
            raise ValueError(f"memory_write_gate must be one of {WRITE_GATES}, got {memory_write_gate!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def layer_has_memory(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` (0-based) keeps a memory."""
        return self.memory_enabled and (self.memory_layers is None or layer_idx + 1 in self.memory_layers)
