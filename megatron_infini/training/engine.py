"""DeepSpeed engine over Megatron-core's tensor-parallel groups.

DeepSpeed only needs to know which ranks hold replicas (data parallel: it reduces gradients
and shards ZeRO state there) and which hold shards of one model (tensor parallel: it folds
them into the gradient norm). `MegatronMPU` answers those questions from
`megatron.core.parallel_state`.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from megatron.core import parallel_state as ps

from .config import Config


class MegatronMPU:
    """The `mpu` object `deepspeed.initialize` asks for (it wants the `get_model_parallel_*`
    names, which `parallel_state` does not have)."""

    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    # Context-parallel ranks hold replicas of the weights and each computes gradients from its
    # block of the sequence: DeepSpeed's "data parallel" group is dp x cp (it averages gradients
    # there, which with a per-rank mean loss over equal blocks gives the whole-sequence mean).
    get_data_parallel_rank = staticmethod(lambda: ps.get_data_parallel_rank(with_context_parallel=True))
    get_data_parallel_world_size = staticmethod(
        lambda: ps.get_data_parallel_world_size(with_context_parallel=True))
    get_data_parallel_group = staticmethod(lambda: ps.get_data_parallel_group(with_context_parallel=True))
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)


def is_gate(param: torch.nn.Parameter) -> bool:
    """The Infini gate logits beta (one per head), marked by `InfiniCoreAttention`. Not by name:
    other modules call parameters "gate" too (mixture-of-experts routers, gated MLPs)."""
    return bool(getattr(param, "infini_gate", False))


def param_groups(model: torch.nn.Module, cfg: Config) -> List[Dict[str, Any]]:
    """AdamW groups: matrices with weight decay; norms and biases without; the Infini gates
    with their own learning rate and no weight decay (docs/infini.md: at the global lr with weight
    decay ~95% of gates stay stuck at 0.5)."""
    opt = cfg.optimizer
    decay, no_decay, gates = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_gate(p):
            gates.append(p)
        elif p.dim() < 2 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        dict(params=decay, weight_decay=opt.weight_decay, lr=opt.lr, peak_lr=opt.lr, name="decay"),
        dict(params=no_decay, weight_decay=0.0, lr=opt.lr, peak_lr=opt.lr, name="no_decay"),
        dict(params=gates, weight_decay=0.0, lr=opt.gate_lr, peak_lr=opt.gate_lr, name="gates"),
    ]
    return [g for g in groups if g["params"]]


def use_bf16(cfg: Config) -> bool:
    if cfg.deepspeed.precision == "auto":
        return torch.cuda.is_available()
    return cfg.deepspeed.precision == "bf16"


def deepspeed_config(cfg: Config, dp_size: int) -> Dict[str, Any]:
    t, opt = cfg.train, cfg.optimizer
    ds: Dict[str, Any] = {
        # DeepSpeed counts each context-parallel rank as a data-parallel replica
        "train_batch_size": t.global_batch_size * cfg.parallel.context_parallel_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp_size),
        "gradient_clipping": opt.clip_grad,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": [opt.beta1, opt.beta2],
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                # fused Adam is CUDA-only; torch's AdamW runs everywhere
                "torch_adam": not torch.cuda.is_available(),
            },
        },
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": use_bf16(cfg)},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.zero_stage == 3:
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False})
    _merge(ds, cfg.deepspeed.extra)
    return ds


def _merge(into: Dict[str, Any], extra: Dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def build_engine(model: torch.nn.Module, cfg: Config, dp_size: int):
    """deepspeed.initialize with our parameter groups and Megatron's parallel groups."""
    import deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg),
        config=deepspeed_config(cfg, dp_size),
        mpu=MegatronMPU(),
        dist_init_required=False,
    )
    return engine, optimizer
