"""A back-of-the-envelope estimate of GPU memory per rank, so `launch submit` refuses a job that
cannot fit before it waits in the queue.

    total = 1.1 * (states + activations + logits) + 2 GiB       (CUDA context, NCCL, fragmentation)

- states (bytes per parameter, mixed precision; Rajbhandari et al. 2020, "ZeRO"):
  weights 2 (bf16), gradients 2, optimizer 12 (fp32 master copy + Adam m and v); in fp32:
  4 + 4 + 8. Tensor parallelism divides all of them by TP. ZeRO over the data-parallel
  ranks (DP) divides: stage 1 the optimizer states, stage 2 also the gradients, stage 3 also
  the weights.
- activations per layer (Korthikanti et al. 2022, "Reducing Activation Recomputation", bf16):
  s*b*h*(10 + 24/TP) bytes, or s*b*h*34/TP with sequence parallelism, plus the attention
  scores 5*a*s*N*b/TP: Infini-attention scores only the local segment of N tokens, so the
  paper's a*s^2 becomes a*s*N. With full layer recomputation only each layer's input is
  kept (2*s*b*h/TP-or-not) plus one layer's activations.
- logits: s*b*V*8/TP bytes (fp32 logits and their gradient in the cross-entropy); with
  `model.loss_chunk_tokens` = c > 0 (the chunked LM loss) min(c, s*b)*V*8/TP + V*h*4/TP
  (one chunk's logits and gradient, and the output weight's fp32 gradient accumulator).

s = train.seq_length, b = micro batch, h = hidden size, a = attention heads, N = segment length,
V = vocabulary (32000 when the config leaves it to the tokenizer). The numbers are meant to be
within ~25% of what a run peaks at, erring high; `--skip-memory-check` overrides a refusal.
"""

from __future__ import annotations

GIB = 1024**3
DEFAULT_VOCAB = 32000


def count_parameters(model) -> int:
    """Parameters of the Llama-style Infini GPT model described by a ModelConfig-like object."""
    h, layers, heads = model.hidden_size, model.num_layers, model.num_attention_heads
    groups = getattr(model, "num_query_groups", None) or heads
    head_dim = h // heads
    swiglu = getattr(model, "activation", "swiglu") == "swiglu"
    ffn = getattr(model, "ffn_hidden_size", None)
    if ffn is None:
        ffn = ((int(8 * h / 3) + 63) // 64) * 64 if swiglu else 4 * h
    vocab = getattr(model, "vocab_size", None) or DEFAULT_VOCAB
    attention = h * (heads + 2 * groups) * head_dim + heads * head_dim * h + heads  # qkv, out, gates
    mlp = (3 if swiglu else 2) * h * ffn
    per_layer = attention + mlp + 2 * h  # two norms
    embeddings = vocab * h * (2 if getattr(model, "untie_embeddings", True) else 1)
    return layers * per_layer + embeddings + h


def estimate_memory_gb(model, parallel, zero_stage: int, micro_batch: int, seq_length: int,
                       data_parallel_size: int = 1, precision: str = "bf16") -> float:
    """Estimated peak GPU memory of one rank in GiB (see the module docstring for the formula)."""
    tp = parallel.tensor_model_parallel_size
    sp = bool(getattr(parallel, "sequence_parallel", False))
    cp = getattr(parallel, "context_parallel_size", 1)
    dp = max(1, data_parallel_size) * cp  # ZeRO shards over data x context parallel ranks
    seq_length = seq_length // cp  # each context-parallel rank holds s / cp tokens
    params = count_parameters(model) / tp
    weight_b, grad_b, optim_b = (4, 4, 8) if precision == "fp32" else (2, 2, 12)
    states = params * (
        weight_b / (dp if zero_stage >= 3 else 1)
        + grad_b / (dp if zero_stage >= 2 else 1)
        + optim_b / (dp if zero_stage >= 1 else 1)
    )
    s, b, h, a = seq_length, micro_batch, model.hidden_size, model.num_attention_heads
    n = min(getattr(model, "segment_length", s) or s, s)
    layer = s * b * h * (34 / tp if sp else 10 + 24 / tp) + 5 * a * s * n * b / tp
    if getattr(model, "recompute_layers", False):
        activations = model.num_layers * 2 * s * b * h / (tp if sp else 1) + layer
    else:
        activations = model.num_layers * layer
    vocab = getattr(model, "vocab_size", None) or DEFAULT_VOCAB
    chunk = getattr(model, "loss_chunk_tokens", 0) or 0
    logits = (min(chunk, s * b) * vocab * 8 + vocab * h * 4) / tp if chunk else s * b * vocab * 8 / tp
    return (1.1 * (states + activations + logits) + 2 * GIB) / GIB


#: bytes per parameter in one checkpoint (checkpointing/manager.py): the model weights in the
#: training precision (model/, 2 in bf16), DeepSpeed's module copy (2) and its optimizer state:
#: fp32 master weights and Adam's two moments (12). In fp32 4 + 4 + 8 (no master copy).
CHECKPOINT_BYTES_PER_PARAM = {"bf16": 16, "fp32": 16}


def checkpoint_bytes(model, precision: str = "bf16") -> int:
    """Size of one training checkpoint of the whole job (all ranks together), in bytes."""
    return count_parameters(model) * CHECKPOINT_BYTES_PER_PARAM["fp32" if precision == "fp32" else "bf16"]
