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

from .config import Config, ConfigError


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


def grad_accum_dtype(cfg: Config, bf16: bool) -> str:
    """The gradient accumulation dtype: fp32 in fp32 training; with bf16 `deepspeed.grad_accum_dtype`,
    whose auto is fp32 with ZeRO 1-3 (DeepSpeed's BF16 optimizer for ZeRO-1) and bf16 with
    zero_stage 0, where DeepSpeed has no fp32 accumulation."""
    ds = cfg.deepspeed
    if not bf16:
        return "fp32"
    if ds.grad_accum_dtype == "auto":
        return "fp32" if ds.zero_stage >= 1 else "bf16"
    if ds.grad_accum_dtype == "fp32" and ds.zero_stage == 0:
        raise ConfigError("deepspeed.grad_accum_dtype=fp32 with bf16 needs deepspeed.zero_stage >= 1 "
                          "(DeepSpeed accumulates in bf16 without ZeRO); use auto or bf16")
    return ds.grad_accum_dtype


def optimizer_impl(cfg: Config) -> str:
    """`optimizer.impl` resolved: auto is torch's fused AdamW on GPU (nothing to compile on the
    nodes), torch's AdamW on CPU."""
    impl = cfg.optimizer.impl
    if impl == "auto":
        return "torch_fused" if torch.cuda.is_available() else "torch"
    if impl == "deepspeed" and not torch.cuda.is_available():
        raise ConfigError("optimizer.impl=deepspeed (DeepSpeed's FusedAdam) needs a GPU; use auto, torch or torch_fused")
    return impl


def deepspeed_config(cfg: Config, dp_size: int) -> Dict[str, Any]:
    t, opt = cfg.train, cfg.optimizer
    bf16, impl = use_bf16(cfg), optimizer_impl(cfg)
    adam: Dict[str, Any] = {"torch_adam": impl != "deepspeed"}
    if impl == "torch_fused":
        adam["fused"] = True  # passed on to torch.optim.AdamW
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
                **adam,
            },
        },
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if bf16:  # Megatron's numerics: bf16 weights and activations, fp32 gradients and reduction
        ds["data_types"] = {"grad_accum_dtype": grad_accum_dtype(cfg, bf16)}
        ds["communication_data_type"] = cfg.deepspeed.communication_data_type
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
    keep_clipped_norm(engine)
    return engine, optimizer


def keep_clipped_norm(engine) -> None:
    """Make `engine.get_global_grad_norm()` report the norm at ZeRO stage 0 in fp32 too.

    Workaround (DeepSpeed 0.19): there the engine clips with `clip_fp32_gradients`, which
    computes the global gradient norm and drops it, so `get_global_grad_norm()` stays None
    and `metrics.jsonl` logged grad_norm 0.0 at every step. The same call, keeping its result.
    """
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients():
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                               mpu=engine.mpu)
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_fp32_gradients
