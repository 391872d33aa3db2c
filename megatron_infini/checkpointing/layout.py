"""What a checkpoint records about the model and the parallel layout, and the checks on resume.

`model_signature` is everything that fixes the shapes and the meaning of the stored tensors
(sizes, vocabulary, fused layouts, memory type); it goes into meta.json. A checkpoint whose
signature differs from the run's is refused with one error naming every differing field,
before any tensor is read. The parallel layout (tp, cp, dp, ZeRO stage) may change freely.
"""

from __future__ import annotations

from typing import Dict, Optional

#: field -> how to fix it in the run's config
_HINTS = {
    "vocab_size": "model.vocab_size (the padded size; it depends on the tensor-parallel size when left "
                  "unset: set model.vocab_size to the checkpoint's value)",
}


def model_signature(model) -> Dict[str, object]:
    """Shape-defining settings of a Megatron GPTModel built by training/model.py."""
    c = model.config
    return {
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.ffn_hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": c.num_query_groups,
        "gated_linear_unit": bool(c.gated_linear_unit),
        "normalization": c.normalization,
        "vocab_size": getattr(model, "vocab_size", None),
        "untie_embeddings": not getattr(model, "share_embeddings_and_output_weights", False),
        "memory_enabled": bool(getattr(c, "memory_enabled", True)),
        "memory_update": getattr(c, "memory_update", None),
        "memory_layers": list(getattr(c, "memory_layers", None) or []) or None,
        "memory_free_attention": getattr(c, "memory_free_attention", "segment"),
    }


def check_signature(path: str, saved: Optional[dict], current: dict) -> None:
    """ValueError naming every field where the checkpoint's model differs from this run's."""
    if not saved:  # written before signatures were recorded: the tensor shapes are checked on load
        return
    diffs = [f"{k}: checkpoint {saved[k]!r}, this run {current.get(k)!r}"
             for k in sorted(saved) if k in current and saved[k] != current[k]]
    if diffs:
        fields = sorted(k for k in saved if k in current and saved[k] != current[k])
        hints = "; ".join(_HINTS[k] for k in fields if k in _HINTS)
        raise ValueError(f"checkpoint {path} holds another model than this run builds ("
                         + "; ".join(diffs) + "). Set the model.* fields to the checkpoint's values"
                         + (f" ({hints})" if hints else "") + " or resume from another checkpoint")


def parallel_layout(engine, tp: int) -> Dict[str, int]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    world = dist.get_world_size() if dist.is_initialized() else 1
    cp = ps.get_context_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    return {"world_size": world, "tensor_model_parallel_size": tp, "context_parallel_size": cp,
            "data_parallel_size": world // (tp * cp),
            "zero_stage": getattr(engine, "zero_optimization_stage", lambda: None)()}


def same_layout(meta: dict, now: Dict[str, int]) -> bool:
    """Same ranks doing the same work: per-rank state (RNG streams) maps 1:1."""
    return (meta.get("tensor_model_parallel_size") == now["tensor_model_parallel_size"]
            and meta.get("world_size") == now["world_size"]
            and meta.get("context_parallel_size", 1) == now["context_parallel_size"])
