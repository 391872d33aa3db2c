"""Per-layer diagnostics of the Infini memory, for metrics.jsonl and W&B.

- gate statistics: mean sigmoid(beta) and the share of heads below 0.1 / above 0.9 (a
  reproduction found ~95% of gates stuck at 0.5 without the gate's own lr; docs/infini.md);
- memory-state norms: Frobenius norm of M and mean of z after the last forward pass.
Heads are split over tensor-parallel ranks, so sums and counts are reduced over that group.
"""

from __future__ import annotations

import contextlib
from typing import Dict

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def _cores(model):
    from megatron_infini.streaming import infini_cores

    return list(infini_cores(model))


def _tp_sum(t: torch.Tensor) -> torch.Tensor:
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    return t


def _from_last_cp_rank(t: torch.Tensor) -> torch.Tensor:
    """With context parallelism the memory of the whole sequence ends on the last CP rank."""
    cp = ps.get_context_parallel_world_size()
    if cp > 1:
        t = t * float(ps.get_context_parallel_rank() == cp - 1)
        dist.all_reduce(t, group=ps.get_context_parallel_group())
    return t


def _gathered(p):
    if hasattr(p, "ds_id"):  # ZeRO-3 partitioned parameter
        import deepspeed

        return deepspeed.zero.GatheredParameters([p])
    return contextlib.nullcontext()


@torch.no_grad()
def gate_stats(model) -> Dict[str, float]:
    out: Dict[str, float] = {}
    all_sums = []
    for core in _cores(model):
        if getattr(core, "gate", None) is None:
            continue
        with _gathered(core.gate):
            g = torch.sigmoid(core.gate.detach().float())
            t = torch.stack([g.sum(), (g < 0.1).float().sum(), (g > 0.9).float().sum(),
                             torch.tensor(float(g.numel()), device=g.device)])
        t = _tp_sum(t)
        all_sums.append(t)
        n = t[3].item()
        L = core.layer_number
        out[f"gate/layer{L}/mean"] = t[0].item() / n
        out[f"gate/layer{L}/below_0.1"] = t[1].item() / n
        out[f"gate/layer{L}/above_0.9"] = t[2].item() / n
    if all_sums:
        total = torch.stack(all_sums).sum(0)
        out["gate/mean"] = total[0].item() / total[3].item()
        out["gate/below_0.1"] = total[1].item() / total[3].item()
        out["gate/above_0.9"] = total[2].item() / total[3].item()
    return out


@torch.no_grad()
def memory_stats(model) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for core in _cores(model):
        stats = getattr(core, "last_memory_stats", None)  # (sum of M^2, sum of z, count of z)
        if stats is None:
            continue
        t = _tp_sum(stats.detach().float().clone())
        t = _from_last_cp_rank(t)
        out[f"memory/layer{core.layer_number}/M_norm"] = t[0].sqrt().item()
        out[f"memory/layer{core.layer_number}/z_mean"] = (t[1] / t[2]).item()
    return out
