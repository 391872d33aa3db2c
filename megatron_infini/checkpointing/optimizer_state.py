"""Optimizer state as sharded tensors laid out like the weights, so that it reshards with them.

For every trainable parameter whose weight is the ShardedTensor (or factory) `W` of the
model's `sharded_state_dict()`, a checkpoint holds, in W's layout (global shape, tensor-parallel
split, the fused QKV and SwiGLU factories, the per-head Infini gates split on dim 0):

    optimizer.<k>.<W.key>           each tensor of the optimizer's per-parameter state
                                    (AdamW: exp_avg, exp_avg_sq), fp32
    optimizer.fp32_param.<W.key>    the fp32 master weights, only when the model trains in bf16
                                    (in fp32 the weights are the master weights: stored once)

and meta.json `optimizer` holds the step and the list of keys. Any data-, tensor- or
context-parallel layout then reads back what it needs, as it does for the weights (the way
Megatron's distributed optimizer stores its `fully_reshardable` format).

ZeRO keeps a flat slice of each parameter's state on each rank of the data-parallel group
(dp x cp here). Saving gathers a parameter's full tensor-parallel-local state with DeepSpeed's
public tensor-fragment API (`deepspeed.utils.safe_get_full_*`, an all-reduce over that group);
one rank of the group, the parameter's *owner* (parameters are dealt out by size, the largest
first to the least loaded rank), keeps it and writes it. So every rank writes a share and holds
at most its share plus one parameter. Loading mirrors it: each owner reads its parameters in
the new layout, broadcasts each to its group, and every rank keeps its own slice
(`safe_set_full_*`). ZeRO stage 0 with fp32 weights has no fragments: the torch optimizer's
state is read and written directly. With ZeRO-3 the same API gathers and scatters DeepSpeed's
partitions; the caller gathers the (partitioned) weights around building the sharded state.

Legend: dp data-parallel size (times cp), tp tensor-parallel size.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

PREFIX = "optimizer"
MASTER = "fp32_param"


# --------------------------------------------------------------------------- structure


def param_entries(model: torch.nn.Module, sharded: dict) -> List[Tuple[str, torch.nn.Parameter, object]]:
    """(state-dict key, parameter, its ShardedTensor or factory) for each trainable parameter,
    in `named_parameters` order (the same on every rank of a data-parallel group)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    by_param = {}
    for key, sh in sharded.items():
        if isinstance(sh, (ShardedTensor, ShardedTensorFactory)) and isinstance(sh.data, torch.nn.Parameter):
            by_param.setdefault(id(sh.data), (key, sh))
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in by_param:
            raise RuntimeError(f"parameter {name} is not in the model's sharded_state_dict: its optimizer "
                               "state could not be checkpointed")
        key, sh = by_param[id(p)]
        out.append((key, p, sh))
    return out


def owners(sizes: List[int], group_size: int) -> List[int]:
    """Deal parameters out over the group: the largest first, each to the least loaded rank."""
    load = [0] * group_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(group_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def kind(engine) -> str:
    """How the optimizer holds its state: "zero3" (partitioned parameters), "fragments" (ZeRO
    1/2 or DeepSpeed's bf16 optimizer: flat fp32 slices) or "plain" (a torch optimizer over
    the parameters themselves: ZeRO 0 in fp32)."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for p in params):
        return "zero3"
    if any(hasattr(p, "_hp_mapping") for p in params):
        return "fragments"
    return "plain"


def _base(engine) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed steps (over flat fp32 slices, or the parameters)."""
    return engine.basic_optimizer


def _shape(p) -> torch.Size:
    """A parameter's full (tensor-parallel-local) shape, also when ZeRO-3 has partitioned it."""
    return torch.Size(getattr(p, "ds_shape", None) or p.shape)


def _has_state(base) -> bool:
    return any(len(s) for s in base.state.values())


def _flats(engine) -> List[Tuple[int, torch.Tensor]]:
    """(param group index, tensor) for each tensor the torch optimizer steps. ZeRO-3 puts its
    fp32 partitions into the groups only around its step."""
    opt, base = engine.optimizer, _base(engine)
    if kind(engine) == "zero3":
        return [(opt.sub_group_to_group_id[i], f) for i, f in enumerate(opt.fp32_partitioned_groups_flat)]
    return [(gi, p) for gi, g in enumerate(base.param_groups) for p in g["params"]]


def state_keys(engine) -> List[str]:
    """Per-parameter state tensors of the optimizer (AdamW: exp_avg, exp_avg_sq); none before
    its first step."""
    base = _base(engine)
    for _, p in _flats(engine):
        st = base.state.get(p, {})
        if st:
            return sorted(k for k, v in st.items() if torch.is_tensor(v) and v.shape == p.shape)
    return []


def get_step(engine) -> int:
    base = _base(engine)
    for group in base.param_groups:
        if "step" in group:  # DeepSpeed's fused Adam keeps it per group
            return int(group["step"])
    for st in base.state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def _set_step(base, step: int) -> None:
    for group in base.param_groups:
        if "step" in group:
            group["step"] = step
    for st in base.state.values():
        if "step" in st:
            if torch.is_tensor(st["step"]):
                st["step"].fill_(step)
            else:
                st["step"] = step


def has_master_weights(engine, k: str) -> bool:
    """fp32 master weights distinct from the model's (bf16 training)."""
    return k != "plain" and any(p.dtype != torch.float32 for p in engine.module.parameters())


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def _like(sh, key: str, data: torch.Tensor):
    """`sh` (a weight's ShardedTensor or factory) for another tensor of the same local shape,
    main replica along data parallelism (only the owner contributes it)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    rid = sh.replica_id
    rid = (*rid[:-1], 0) if isinstance(rid, tuple) else 0
    kw = dict(key=key, data=data, replica_id=rid)
    if not isinstance(sh, ShardedTensorFactory):
        kw["dtype"] = data.dtype
    return replace(sh, **kw)


def link_fragments(engine) -> None:
    """Point every parameter's fragment views at the optimizer's current state tensors.

    DeepSpeed links them once, right after the step of the first parameter group (0.19:
    `_lazy_init_hp_params_optimizer_state`), when the other groups have no state yet, so
    `safe_get_full_optimizer_state` fails for them. Linking again is what DeepSpeed's own
    function does, with every group's state in place."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    opt, base = engine.optimizer, _base(engine)
    lp = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups")  # ZeRO 1/2 | bf16 optimizer
    hp = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_groups_flat_partition")
    for lp_params, flat in zip(lp, hp):
        if base.state.get(flat):
            lazy_init_hp_params_optimizer_state(lp_params, flat, base.state)


# --------------------------------------------------------------------------- save


def _full(p, key: str, k: str, base) -> torch.Tensor:
    """Full tensor-parallel-local fp32 tensor of parameter p: state `key` or the master weight.
    Collective over the data-parallel group for "fragments"."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if k == "plain":
        return p.detach() if key == MASTER else base.state[p][key]
    return safe_get_full_fp32_param(p) if key == MASTER else safe_get_full_optimizer_state(p, key)


def sharded_state(engine, model, model_sharded: dict) -> Tuple[dict, dict]:
    """Collective over the data-parallel group. Returns (this rank's share of the optimizer
    state as sharded tensors, the `optimizer` entry of meta.json)."""
    k = kind(engine)
    base = _base(engine)
    keys = state_keys(engine)
    if k == "fragments" and keys:
        link_fragments(engine)
    tensors = list(keys) + ([MASTER] if has_master_weights(engine, k) else [])
    entries = param_entries(model, model_sharded)
    group = _dp_group()
    me, size = dist.get_rank(group), dist.get_world_size(group)
    own = owners([_shape(p).numel() for _, p, _ in entries], size)
    out = {}
    for i, (name, p, sh) in enumerate(entries):
        for key in tensors:
            full = _full(p, key, k, base)  # every rank takes part in the gather
            if own[i] == me:
                out[f"{PREFIX}.{key}.{name}"] = _like(sh, f"{PREFIX}.{key}.{sh.key}",
                                                      full.detach().float().reshape(_shape(p)).clone())
    info = {"format": "sharded", "step": get_step(engine), "keys": keys, "master_weights": MASTER in tensors}
    return out, info


# --------------------------------------------------------------------------- load


def _materialize(engine, k: str) -> None:
    """Give the optimizer its state tensors before the first step (torch and DeepSpeed create
    them lazily): one step of the torch optimizer with zero gradients and lr 0 (no change to
    any weight), then DeepSpeed links its per-parameter views to them."""
    base = _base(engine)
    if _has_state(base):
        return
    saved = [(g["lr"], g.get("weight_decay"), g["params"]) for g in base.param_groups]
    for g in base.param_groups:
        g["lr"] = 0.0
        if "weight_decay" in g:
            g["weight_decay"] = 0.0
    flats = _flats(engine)
    grads = [p.grad for _, p in flats]
    for _, p in flats:
        p.grad = torch.zeros_like(p)
    if k == "zero3":  # as DeepSpeed's ZeRO-3 step does: one partition at a time in its group
        for gi, p in flats:
            base.param_groups[gi]["params"] = [p]
            base.step()
    else:
        base.step()
    for g, (lr, wd, params) in zip(base.param_groups, saved):
        g["lr"], g["params"] = lr, params
        if wd is not None:
            g["weight_decay"] = wd
    for (_, p), grad in zip(flats, grads):
        p.grad = grad
    if k == "fragments":
        link_fragments(engine)


def load(engine, model, model_sharded: dict, info: dict, read) -> None:
    """Collective over the data-parallel group. Put the saved optimizer state (meta.json
    `optimizer` entry `info`) into the engine, for this run's layout.

    read(sharded) -> loaded: loads a dict of sharded tensors from the checkpoint (the caller
    owns the strategy); called once, on every rank, with this rank's share.
    The model weights must already be loaded (and the fp32 master copy refreshed from them);
    with ZeRO-3, `model_sharded` is built with the parameters gathered.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    k = kind(engine)
    base = _base(engine)
    keys = list(info["keys"])
    tensors = keys + ([MASTER] if info.get("master_weights") else [])
    entries = param_entries(model, model_sharded)
    group = _dp_group()
    me, size = dist.get_rank(group), dist.get_world_size(group)
    own = owners([_shape(p).numel() for _, p, _ in entries], size)
    request = {}
    for i, (name, p, sh) in enumerate(entries):
        if own[i] == me:
            for key in tensors:
                request[f"{PREFIX}.{key}.{name}"] = _like(
                    sh, f"{PREFIX}.{key}.{sh.key}", torch.empty(_shape(p), dtype=torch.float32, device=p.device))
    loaded = read(request) if tensors else {}  # (saved before the first step: nothing)
    if keys:
        _materialize(engine, k)
        missing = sorted(set(keys) - set(state_keys(engine)))
        if missing:
            raise ValueError(f"the checkpoint's optimizer state has {missing}, which this run's optimizer does not "
                             "keep (a different optimizer): set checkpoint.allow_fresh_optimizer=true to start it anew")
    run_master = has_master_weights(engine, k)
    for i, (name, p, sh) in enumerate(entries):
        for key in tensors:
            if own[i] == me:
                t = loaded.pop(f"{PREFIX}.{key}.{name}").to(p.device)
            else:
                t = torch.empty(_shape(p), dtype=torch.float32, device=p.device)
            dist.broadcast(t, src=dist.get_global_rank(group, own[i]), group=group)
            if key == MASTER:
                if run_master:
                    safe_set_full_fp32_param(p, t)
                elif k == "zero3":  # fp32 ZeRO-3 run: its master copy was refreshed from the weights
                    continue
                else:  # a bf16 checkpoint resumed in fp32: the master weights are the better copy
                    with torch.no_grad():
                        p.copy_(t)
            elif k == "plain":
                base.state[p][key].copy_(t)
            else:
                safe_set_full_optimizer_state(p, t, key)
    if info.get("master_weights") and not run_master and k == "fragments":
        engine.optimizer.refresh_fp32_params()  # fp32 copy from the weights just set
    if keys:
        _set_step(base, int(info["step"]))
