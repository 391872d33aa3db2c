"""`InfiniTransformerConfig`: Megatron's `TransformerConfig` plus the Infini-attention fields.

Every field of Megatron's config keeps its meaning. The new fields configure the op
(`megatron_infini.ops.infini_attention`) used by every attention layer of the model. Bad
values and combinations the layer does not support raise `ValueError` at construction, with
a message that names the fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_infini.ops import UPDATE_RULES

#: Memory types of `InfiniTransformerConfig.memory_type`.
MEMORY_TYPES = ("infini", "compressive", "xl")
#: Values of `memory_write_gate`.
WRITE_GATES = ("none", "hard", "sigmoid")
MEMORY_FREE_ATTENTION = ("segment", "xl")

#: |gate_init| above this saturates the sigmoid: the memory path (very negative) or the
#: local path (very positive) gets no gradient. docs/infini.md: a -100 init killed the memory.
GATE_INIT_LIMIT = 10.0


@dataclass
class InfiniTransformerConfig(TransformerConfig):
    """TransformerConfig for models whose attention layers are Infini-attention."""

    segment_length: int = 2048
    """N: tokens per segment. Local softmax attention stays inside a segment (RoPE positions
    0..N-1); the compressive memory carries everything before it. Must be >= 1."""

    memory_update: str = "linear"
    """Memory update rule: "linear" (M += sigma(K)^T V) or "delta" (M += sigma(K)^T (V - read))."""

    gate_init: float = 0.0
    """Initial gate logit beta of every head; output = sigmoid(beta) * A_mem +
    (1 - sigmoid(beta)) * A_local. 0.0 mixes both paths half and half. Must be finite with
    |gate_init| <= 10 (a saturated sigmoid stops the gradient of one path)."""

    checkpoint_segments: int = 0
    """Activation checkpointing inside the op: 0 keeps all activations; k > 0 recomputes them
    in backward in blocks of k segments, keeping only the memory state between blocks."""

    memory_write_gate: str = "none"
    """Learned write strengths: token t enters the memory (M and z) with weight w_t computed
    per key/value group g from its key (without RoPE), so a layer can keep filler out of the
    normaliser that dilutes a stored fact as the input grows (docs/generalisation.md).
    "none": every token with weight 1 (the paper). "hard": w_t = clamp(u_g . k_t + c_g, 0, 1),
    exactly 0 for tokens the layer learns to skip, so they never accumulate, whatever the
    length. "sigmoid": w_t = sigmoid(u_g . k_t + c_g) (never 0). Both start with w = 1/2
    everywhere, which gives exactly the paper's output (M and z scale together). Not
    supported with context_parallel_size > 1."""

    memory_write_init: float = 0.5
    """Initial write strength of every token with `memory_write_gate` (in (0, 1)); any constant
    gives the paper's output. Near 0 a "hard" gate starts close to skipping, so tokens the loss
    does not need drop out of the memory early."""

    memory_write_l1: float = 0.0
    """lambda >= 0: with `memory_write_gate`, the training loss gains lambda * (mean write
    strength over tokens and key/value heads of each memory layer, summed over layers): a
    sparsity penalty that drives the strengths of tokens the loss does not need to exactly 0
    ("hard"). Measured on a tiny passkey model (docs/generalisation.md): from the first step it
    empties the memory before retrieval is learned; the trainer's `model.memory_write_l1_start`
    delays it. Not with recompute_granularity="full" (the recomputed forward has no autograd,
    the penalty would get no gradient); checkpoint_segments keeps it."""

    memory_repeat_max: int = 1
    """Training-time augmentation of the memory's length, R >= 1 (1: off, the paper). In a
    training forward each segment of each sequence is written to the memory as if it were
    repeated m times in a row: its writes are multiplied by an integer m in 1..R drawn per
    segment and sequence (P(m) proportional to log((m + 1) / m), log-uniform), which for the
    linear update is exactly the memory left by the repeated segments (tested). A layer that
    stores filler along with what the loss needs then pays at training time for the dilution
    it would meet at R times the training length. Drawn from the default torch RNG,
    independently per memory layer; evaluation and streaming are unchanged. Linear update
    only; not with context_parallel_size > 1. docs/generalisation.md measures it."""

    memory_enabled: bool = True
    """False turns the memory off (ablation): attention is causal softmax attention within each
    segment only, and the layers hold no gate parameter."""

    memory_layers: Optional[tuple] = None
    """Layer numbers (1-based, as Megatron's `layer_number`) whose attention keeps a memory;
    the others are segment-local attention only, with no gate. None: every layer (the paper).
    docs/generalisation.md: a tiny passkey model generalised past its training length more
    reliably with the memory in its top layer only."""

    memory_free_attention: str = "segment"
    """Attention of the layers without memory (memory_layers, or memory_enabled=False):
    "segment" (causal within the segment, the paper's local attention) or "xl" (Transformer-XL:
    the segment also attends to the keys/values of the xl_memory_length tokens before it,
    default segment_length, carried across segments and forward calls like a memory). With
    "xl" what such a layer computes for a token does not depend on where a segment boundary
    falls; docs/generalisation.md measures it. Needs get_gpt_block_infini_spec(config)."""

    memory_type: str = "infini"
    """Memory of every attention layer: "infini" (compressive memory M, z of fixed size),
    "compressive" (Compressive Transformer, Rae et al. 2019: FIFO memory of past keys/values
    plus a FIFO of their learned compressions) or "xl" (Transformer-XL: the FIFO memory only).
    The last two ignore memory_update, gate_init; see docs/memories.md."""

    xl_memory_length: Optional[int] = None
    """n_m: past tokens (keys and values, per head) kept by "compressive" / "xl" layers;
    default: segment_length. A multiple of compression_rate for "compressive"."""

    compressed_memory_length: Optional[int] = None
    """n_cm: compressed slots kept by "compressive" layers (each stands for compression_rate
    tokens: the layer reaches n_m + c * n_cm tokens back); default: xl_memory_length."""

    compression_rate: int = 2
    """c: the compressor (1D convolution, kernel = stride = c, per key/value head) turns c
    evicted tokens into one compressed slot ("compressive" only). Must divide segment_length
    and xl_memory_length."""

    reconstruction_loss_weight: float = 1.0
    """Weight of the attention-reconstruction loss that trains the compressor ("compressive"
    only; it reaches no other parameter). Finite, >= 0."""

    attention_dropout: float = 0.0
    """Overrides Megatron's default 0.1: the fused op has no dropout on attention
    probabilities, so this must be 0.0."""

    def layer_has_memory(self, layer_number: int) -> bool:
        """Whether attention layer `layer_number` (1-based) keeps a memory."""
        return self.memory_enabled and (self.memory_layers is None or layer_number in self.memory_layers)

    def __post_init__(self) -> None:
        self._validate_infini_fields()
        self._validate_memory_type()
        self._validate_parallelism()
        super().__post_init__()
        # Checks that need Megatron's resolved defaults (num_query_groups, kv_channels).
        tp = self.tensor_model_parallel_size
        if self.num_query_groups % tp != 0:
            raise ValueError(
                f"num_query_groups ({self.num_query_groups}) must be a multiple of "
                f"tensor_model_parallel_size ({tp}): each tensor-parallel rank keeps the memory "
                "(M, z) of its own key/value heads, so they cannot be split or replicated"
            )

    def _validate_infini_fields(self) -> None:
        n = self.segment_length
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"segment_length must be an integer >= 1, got {n!r}")
        if self.memory_update not in UPDATE_RULES:
            raise ValueError(f"memory_update must be one of {UPDATE_RULES}, got {self.memory_update!r}")
        g = self.gate_init
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or abs(g) > GATE_INIT_LIMIT:
            raise ValueError(
                f"gate_init must be a finite number in [-{GATE_INIT_LIMIT}, {GATE_INIT_LIMIT}] "
                f"(sigmoid saturates beyond), got {g!r}"
            )
        c = self.checkpoint_segments
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"checkpoint_segments must be an integer >= 0, got {c!r}")
        if self.memory_write_gate not in WRITE_GATES:
            raise ValueError(f"memory_write_gate must be one of {WRITE_GATES}, got {self.memory_write_gate!r}")
        w0 = self.memory_write_init
        if isinstance(w0, bool) or not isinstance(w0, (int, float)) or not 0.0 < w0 < 1.0:
            raise ValueError(f"memory_write_init must be a number in (0, 1), got {w0!r}")
        if self.memory_write_gate != "none" and self.context_parallel_size > 1:
            raise ValueError("memory_write_gate is not supported with context_parallel_size > 1 (the memory relay "
                             "sends unweighted deltas); use context_parallel_size 1")
        lam = self.memory_write_l1
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"memory_write_l1 must be a finite number >= 0, got {lam!r}")
        if lam and self.memory_write_gate == "none":
            raise ValueError("memory_write_l1 > 0 needs learned write strengths: set memory_write_gate to 'hard' "
                             "or 'sigmoid'")
        if lam and self.recompute_granularity == "full":
            # Megatron's CheckpointFunction runs the layer's forward under no_grad: the penalty
            # the trainer adds to the loss would be a constant (tests/test_recompute_losses.py).
            raise ValueError("memory_write_l1 > 0 with recompute_granularity='full': the recomputed forward runs "
                             "without autograd, so the penalty would get no gradient; use checkpoint_segments "
                             "(recomputation inside the op, which keeps it) to bound activation memory")
        r = self.memory_repeat_max
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"memory_repeat_max must be an integer >= 1 (1: off), got {r!r}")
        if r > 1 and self.memory_update != "linear":
            raise ValueError(f"memory_repeat_max > 1 simulates repeated segments, which is a multiplied write for "
                             f"the linear update only; got memory_update={self.memory_update!r}")
        if r > 1 and self.context_parallel_size > 1:
            raise ValueError("memory_repeat_max > 1 is not supported with context_parallel_size > 1 (the memory "
                             "relay sends unweighted deltas); use context_parallel_size 1")
        if not isinstance(self.memory_enabled, bool):
            raise ValueError(f"memory_enabled must be True or False, got {self.memory_enabled!r}")
        if self.memory_layers is not None:
            layers = self.memory_layers
            if (isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__")
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
                    or not layers or len(set(layers)) != len(layers)
                    or not all(1 <= x <= self.num_layers for x in layers)):
                raise ValueError(f"memory_layers must be None or distinct layer numbers in 1..num_layers "
                                 f"({self.num_layers}), got {layers!r}")
            self.memory_layers = tuple(sorted(layers))
        if self.attention_dropout != 0.0:
            raise ValueError(
                f"attention_dropout must be 0.0 for Infini-attention (the op has no attention "
                f"dropout), got {self.attention_dropout!r}"
            )
        unsupported = {
            "attention_output_gate": self.attention_output_gate,
            "multi_latent_attention": self.multi_latent_attention,
            "window_size": self.window_size is not None,
            "softmax_type": self.softmax_type != "vanilla",
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"{', '.join(bad)}: not supported with Infini-attention; leave at the default")

    def _validate_memory_type(self) -> None:
        t = self.memory_type
        if t not in MEMORY_TYPES:
            raise ValueError(f"memory_type must be one of {MEMORY_TYPES}, got {t!r}")
        self._validate_memory_free_attention()
        if t == "infini":
            return
        if self.memory_repeat_max != 1:
            raise ValueError(f"memory_repeat_max augments the Infini memory; leave it at 1 for memory_type={t!r}")
        # Resolve the defaults, then check (n_cm and c only matter for "compressive").
        if self.xl_memory_length is None:
            self.xl_memory_length = self.segment_length
        if self.compressed_memory_length is None:
            self.compressed_memory_length = self.xl_memory_length if t == "compressive" else 0
        fields = {"xl_memory_length": 1}
        if t == "compressive":
            fields.update(compressed_memory_length=1, compression_rate=1)
        for name, low in fields.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low} for memory_type={t!r}, got {v!r}")
        if t == "xl" and self.compressed_memory_length:
            raise ValueError(f"compressed_memory_length ({self.compressed_memory_length}) must be 0 or None "
                             "for memory_type='xl' (Transformer-XL has no compressed memory)")
        c = self.compression_rate
        if t == "compressive" and (self.xl_memory_length % c or self.segment_length % c):
            raise ValueError(
                f"xl_memory_length ({self.xl_memory_length}) and segment_length ({self.segment_length}) must be "
                f"multiples of compression_rate ({c}): the compressor turns each block of {c} evicted tokens "
                "into one slot")
        w = self.reconstruction_loss_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"reconstruction_loss_weight must be a finite number >= 0, got {w!r}")
        unsupported = {
            "memory_enabled=False": not self.memory_enabled,
            "checkpoint_segments > 0": self.checkpoint_segments > 0,
            "context_parallel_size > 1": self.context_parallel_size > 1,
            "recompute_granularity='full'": self.recompute_granularity == "full",
            "rotary_interleaved=True": self.rotary_interleaved,
            f"memory_write_gate={self.memory_write_gate!r}": self.memory_write_gate != "none",
            "memory_layers": self.memory_layers is not None,
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"{', '.join(bad)}: not supported with memory_type={t!r} (local-only attention is "
                             "memory_type='infini' with memory_enabled=False; full recompute would compute the "
                             "reconstruction loss without autograd)")

    def memory_free_xl(self, layer_number: int) -> bool:
        """Whether layer `layer_number` (1-based) is a Transformer-XL layer because it has no
        memory and memory_free_attention is "xl"."""
        return self.memory_free_attention == "xl" and not self.layer_has_memory(layer_number)

    def _validate_memory_free_attention(self) -> None:
        a = self.memory_free_attention
        if a not in MEMORY_FREE_ATTENTION:
            raise ValueError(f"memory_free_attention must be one of {MEMORY_FREE_ATTENTION}, got {a!r}")
        if a == "segment":
            return
        if self.memory_type != "infini":
            raise ValueError(f"memory_free_attention='xl' applies to memory_type='infini' (its layers without "
                             f"memory); memory_type={self.memory_type!r} layers all keep a memory")
        if self.memory_enabled and self.memory_layers is None:
            raise ValueError("memory_free_attention='xl' has no effect: every layer keeps a memory; set memory_layers "
                             "(or memory_enabled=False)")
        if self.xl_memory_length is None:
            self.xl_memory_length = self.segment_length
        n = self.xl_memory_length
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"xl_memory_length must be an integer >= 1 for memory_free_attention='xl', got {n!r}")
        bad = [name for name, on in {"context_parallel_size > 1": self.context_parallel_size > 1,
                                     "rotary_interleaved=True": self.rotary_interleaved}.items() if on]
        if bad:
            raise ValueError(f"{', '.join(bad)}: not supported with memory_free_attention='xl'")

    def _validate_parallelism(self) -> None:
        tp = self.tensor_model_parallel_size
        if self.pipeline_model_parallel_size != 1 or self.virtual_pipeline_model_parallel_size is not None:
            raise ValueError(
                f"pipeline_model_parallel_size ({self.pipeline_model_parallel_size}) and "
                f"virtual_pipeline_model_parallel_size ({self.virtual_pipeline_model_parallel_size}): "
                "pipeline parallelism is not supported by megatron-infini yet; use 1 and None"
            )
        cp = self.context_parallel_size
        if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
            raise ValueError(f"context_parallel_size must be an integer >= 1, got {cp!r}")
        if cp > 1:
            # Each context-parallel rank holds a contiguous block of whole segments and receives
            # the memory of the ranks before it (megatron_infini.parallel), not their keys/values.
            if self.cp_comm_type is not None:
                raise ValueError(
                    f"cp_comm_type ({self.cp_comm_type!r}): Infini-attention does not exchange keys and "
                    "values across context-parallel ranks (it relays the memory); leave cp_comm_type None"
                )
            if self.memory_update == "delta" and self.recompute_granularity == "full":
                raise ValueError(
                    "recompute_granularity='full' with context_parallel_size > 1 and memory_update='delta': "
                    "the recomputed forward would relay the memory again during backward and deadlock; "
                    "use checkpoint_segments to bound activation memory instead"
                )
        if self.num_attention_heads % tp != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"tensor_model_parallel_size ({tp})"
            )
        if self.num_query_groups is not None and self.num_query_groups % tp != 0:
            raise ValueError(
                f"num_query_groups ({self.num_query_groups}) must be a multiple of "
                f"tensor_model_parallel_size ({tp})"
            )


#: The Llama-style choices: RMSNorm, SwiGLU MLP, no biases, no dropout.
LLAMA_DEFAULTS: dict = dict(
    normalization="RMSNorm",
    gated_linear_unit=True,
    activation_func=F.silu,
    add_bias_linear=False,
    hidden_dropout=0.0,
    layernorm_epsilon=1e-5,
)


def llama_config(**fields: Any) -> InfiniTransformerConfig:
    """An `InfiniTransformerConfig` with the Llama-style defaults (`LLAMA_DEFAULTS`); any field
    given here overrides them (e.g. normalization="LayerNorm", activation_func=F.gelu,
    gated_linear_unit=False for a GPT-2-style model)."""
    return InfiniTransformerConfig(**{**LLAMA_DEFAULTS, **fields})
