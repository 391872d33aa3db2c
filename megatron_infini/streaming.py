"""Keep, reset and checkpoint the Infini memory of a model between forward calls.

With carry on, each `InfiniCoreAttention` starts a forward call from the memory (M, z) its
previous call left, instead of an empty memory: streaming inference over an input longer than
one call, or training over a long document in consecutive steps. Gradients never cross a call
(the kept memory is detached). Cut the stream at segment boundaries (multiples of
`segment_length`) to get exactly the result of one call over the whole input.

Memory shapes, per layer and rank: M [b, ng, hn, hn], z [b, ng, hn], float32, where b is the
local batch and ng the key/value heads of this tensor-parallel rank. As a checkpoint, the
memory of layer L is two global tensors `{prefix}layer{L}.M` [B, G, hn, hn] and
`{prefix}layer{L}.z` [B, G, hn] (B = b * dp_size samples, G all key/value heads), split by
sample across data-parallel ranks and by head across tensor-parallel ranks.

Layers with memory_type "compressive" / "xl" (`megatron_infini.layers.compressive`) keep
(k [b, ng, W, hn], v [b, ng, W, hn], valid [b, ng, W]) instead, checkpointed as
`{prefix}layer{L}.k` / `.v` / `.valid`, split the same way.

    set_memory_carry(model, True)          # start streaming (memory empty)
    ... model(chunk_1) ... model(chunk_2)  # chunk_2 reads the memory of chunk_1
    reset_memory(model)                    # next document
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch

from megatron_infini.layers.attention import InfiniCoreAttention
from megatron_infini.layers.compressive import CompressiveCoreAttention


def infini_cores(model: torch.nn.Module) -> Iterator[InfiniCoreAttention]:
    """The core attentions with memory of `model` (any wrapper, any memory_type), in layer order."""
    cores = [m for m in model.modules() if isinstance(m, (InfiniCoreAttention, CompressiveCoreAttention))]
    return iter(sorted(cores, key=lambda m: m.layer_number))


def _names(core) -> Tuple[str, ...]:
    """Names of the tensors of a layer's memory, in the order the layer keeps them."""
    return getattr(core, "memory_names", ("M", "z"))


def set_memory_carry(model: torch.nn.Module, enabled: bool) -> None:
    """Turn keeping the memory between forward calls on or off; both start from empty memory.

    Raises ValueError with `recompute_granularity="full"`: Megatron would run each layer's
    forward a second time in backward, advancing the kept memory twice. Bound activation
    memory with `checkpoint_segments` instead.
    """
    cores = list(infini_cores(model))
    if enabled and any(c.config.recompute_granularity == "full" for c in cores):
        raise ValueError(
            "recompute_granularity='full' cannot be used with memory carry (the recomputed "
            "forward would update the kept memory twice); use checkpoint_segments instead"
        )
    for core in cores:
        core.carry_memory = bool(enabled)
        core.memory = None


def reset_memory(model: torch.nn.Module) -> None:
    """Empty the kept memory of every layer (e.g. at a document boundary); carry stays as is."""
    for core in infini_cores(model):
        core.memory = None


def memory_state_dict(model: torch.nn.Module, prefix: str = "infini_memory.") -> Dict[str, torch.Tensor]:
    """This rank's kept memory: {f"{prefix}layer{L}.M": M, f"{prefix}layer{L}.z": z} (or .k, .v,
    .valid for compressive / xl layers). Layers with no kept memory are left out."""
    out = {}
    for core in infini_cores(model):
        if core.memory is not None:
            for name, t in zip(_names(core), core.memory):
                out[f"{prefix}layer{core.layer_number}.{name}"] = t
    return out


def load_memory_state_dict(
    model: torch.nn.Module, state: Dict[str, torch.Tensor], prefix: str = "infini_memory."
) -> None:
    """Inverse of `memory_state_dict` (also takes what `dist_checkpointing.load` returns for
    `memory_sharded_state_dict`). Layers absent from `state` get an empty memory."""
    for core in infini_cores(model):
        key = f"{prefix}layer{core.layer_number}"
        names = _names(core)
        if f"{key}.{names[0]}" not in state:
            core.memory = None
        elif isinstance(core, CompressiveCoreAttention):
            k, v, valid = (state[f"{key}.{n}"].contiguous() for n in names)
            core.memory = (k, v, valid.float())
        else:
            M, z = state[f"{key}.M"], state[f"{key}.z"]
            core.memory = (M.float().contiguous(), z.float().contiguous())


def memory_sharded_state_dict(
    model: torch.nn.Module,
    prefix: str = "infini_memory.",
    local_batch_size: Optional[int] = None,
    dp_rank: Optional[int] = None,
    dp_size: Optional[int] = None,
) -> dict:
    """The kept memory as Megatron `ShardedTensor`s, for `dist_checkpointing.save` / `load`.

    Global tensors are split by sample across data-parallel ranks (axis 0) and by head across
    tensor-parallel ranks (axis 1); every rank must hold the same local batch size. For
    `load`, layers with no kept memory need `local_batch_size` to allocate zeros to load into.
    dp_rank / dp_size default to Megatron's data-parallel group.
    """
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.utils import get_pg_rank, get_pg_size

    if dp_rank is None:
        dp_rank = parallel_state.get_data_parallel_rank()
    if dp_size is None:
        dp_size = parallel_state.get_data_parallel_world_size()
    out = {}
    for core in infini_cores(model):
        compressive = isinstance(core, CompressiveCoreAttention)
        if core.gate is None and not compressive:
            continue  # memory disabled: nothing to keep
        memory = core.memory
        if memory is None:
            if local_batch_size is None:
                continue
            from megatron_infini.ops import empty_memory

            hn = core.config.kv_channels
            if compressive:  # (an "xl" layer holds no parameter to take the device from)
                memory = core.empty_memory(local_batch_size, "cuda" if torch.cuda.is_available() else "cpu")
            else:
                memory = empty_memory(local_batch_size, core.num_groups_per_partition, hn, hn, core.gate.device)
        tp_rank, tp_size = get_pg_rank(core.tp_group), get_pg_size(core.tp_group)
        for name, t in zip(_names(core), memory):
            key = f"{prefix}layer{core.layer_number}.{name}"
            out[key] = ShardedTensor.from_rank_offsets(
                key, t, (0, dp_rank, dp_size), (1, tp_rank, tp_size), replica_id=0
            )
    return out
