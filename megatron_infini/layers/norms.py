"""LayerNorm / RMSNorm that work with tensor and sequence parallelism, with or without Apex.

Shapes: input [..., h] (e.g. [s, b, h] or [s, b, heads, head_dim] for q/k norms), weight [h].

Why not Megatron's norms: without Apex or Transformer Engine, Megatron falls back to
`torch.nn.LayerNorm` / `RMSNorm`, which refuse `sequence_parallel=True`. And Megatron leaves
the all-reduce of a sequence-parallel norm's weight gradient to its own DDP
(`finalize_model_grads`), so under DeepSpeed those gradients are silently wrong.

What `Norm` does instead: when its input is split across the tensor-parallel group (sequence
parallel, or per-head q/k norms), it routes its weight (and bias) through
`copy_to_tensor_model_parallel_region` in forward: identity forward, all-reduce (sum) of the
weight gradient in backward. Gradients are then correct under any wrapper (plain autograd,
DeepSpeed, Megatron DDP). Under Megatron DDP no second sum happens: those parameters also carry
`average_gradients_across_tp_domain=True`, and `finalize_model_grads` checks that attribute
before `sequence_parallel`, so it *averages* gradients that are already identical across the
group (a no-op on the values).

The kernel: Apex's fused functions when Apex is importable and the input is on CUDA (logged
once), else torch's `F.rms_norm` / `F.layer_norm`. Transformer Engine's `TENorm` is not used:
it owns its weight, so the weight cannot be routed through the reduction above.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.parallel_state import get_tensor_model_parallel_group
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_infini.compat import param_device

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("LayerNorm", "RMSNorm")


@functools.lru_cache(maxsize=None)
def _apex_kernels():
    """(rms_norm_affine, layer_norm_affine) from Apex, or None. Imported lazily, said once."""
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine
    except Exception:  # ImportError, or a broken Apex build
        logger.info("megatron-infini norms: Apex not importable, using torch's fused norms")
        return None
    logger.info("megatron-infini norms: using Apex fused LayerNorm/RMSNorm kernels")
    return fused_rms_norm_affine, fused_layer_norm_affine


class Norm(torch.nn.Module):
    """`config.normalization` ("LayerNorm" or "RMSNorm") over the last dim, TP/SP aware.

    Args (Megatron's norm signature, so it drops into any `ModuleSpec`):
        config: the model config (normalization, sequence_parallel, zero-centred gamma).
        hidden_size: h, the normalised size.
        eps: added to the variance.
        per_head: True for q/k norms, whose input holds only this rank's heads, so their
            weight gradient is also partial per tensor-parallel rank.
        tp_group: tensor-parallel group, default Megatron's.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        per_head: bool = False,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
        **unused,
    ):
        super().__init__()
        if config.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {config.normalization!r}")
        self.rms = config.normalization == "RMSNorm"
        self.hidden_size = hidden_size
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        self.tp_group = tp_group if tp_group is not None else get_tensor_model_parallel_group()
        tp_size = torch.distributed.get_world_size(self.tp_group)
        self.reduce_grad = tp_size > 1 and (config.sequence_parallel or per_head)

        fill = 0.0 if self.zero_centered_gamma else 1.0
        kw = dict(dtype=config.params_dtype, device=param_device(config))
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), fill, **kw))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, **kw))
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel  # Megatron's marker
            if self.reduce_grad:
                p.average_gradients_across_tp_domain = True  # see the module docstring

    def _param(self, p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if p is None or not self.reduce_grad:
            return p
        return copy_to_tensor_model_parallel_region(p, group=self.tp_group)  # backward: all-reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._param(self.weight), self._param(self.bias)
        if self.zero_centered_gamma:
            w = w + 1.0
        apex = _apex_kernels() if x.is_cuda else None
        shape = (self.hidden_size,)
        if self.rms:
            if apex is not None:
                return apex[0](x, w, shape, self.eps)
            return F.rms_norm(x, shape, w, self.eps)
        if apex is not None:
            return apex[1](x, w, b, shape, self.eps)
        return F.layer_norm(x, shape, w, b, self.eps)


def sum_grad_over_tp(param: torch.nn.Parameter, tp_group=None) -> None:
    """Make `param`'s gradient the sum of its per-rank gradients over the tensor-parallel group,
    under any wrapper: a hook sums each backward's gradient before it is accumulated (DeepSpeed
    included). For parameters whose module owns them, so that they cannot be routed like `Norm`'s
    (Transformer Engine's fused norm weights under sequence parallelism). Also marks them
    `average_gradients_across_tp_domain`, so Megatron's DDP does not sum them again (see the
    module docstring)."""
    group = tp_group if tp_group is not None else get_tensor_model_parallel_group()

    def summed(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=group)
        return grad

    param.register_hook(summed)
    param.average_gradients_across_tp_domain = True


def allreduce_sequence_parallel_grads(model: torch.nn.Module, tp_group=None) -> int:
    """Sum over the tensor-parallel group the gradients that Megatron leaves to its own DDP.

    With `sequence_parallel=True`, Megatron's own parameters that see only this rank's part
    of the sequence (e.g. `RowParallelLinear` biases with `add_bias_linear=True`) carry
    `sequence_parallel=True` and get their gradient all-reduced in Megatron DDP's
    `finalize_model_grads`. Call this after backward under any other wrapper (DeepSpeed, plain
    autograd). Our `Norm` parameters reduce themselves and are skipped. Returns the number of
    gradients reduced.
    """
    group = tp_group if tp_group is not None else get_tensor_model_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return 0
    grads = [
        p.grad for p in model.parameters()
        if p.grad is not None and getattr(p, "sequence_parallel", False)
        and not getattr(p, "average_gradients_across_tp_domain", False)
    ]
    if grads:
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, group=group)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)
    return len(grads)
