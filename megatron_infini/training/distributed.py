"""Process groups: torch.distributed from torchrun's environment, then Megatron's parallel state.

Run without torchrun (plain `python -m megatron_infini.train`), the trainer is one process
with world size 1 on a local TCP store.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from .config import Config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config) -> None:
    """Initialise torch.distributed (nccl on GPU, gloo on CPU) and Megatron's groups."""
    # Under torchrun the env:// rendezvous; alone, a private store on a free local port (the
    # environment is left untouched, so subprocesses started later do not inherit a rank).
    init_kwargs = {}
    if "RANK" not in os.environ:
        init_kwargs = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize insists on it
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        from megatron_infini.compat import ensure_cpu_compat

        ensure_cpu_compat()
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=timedelta(minutes=cfg.parallel.timeout_minutes),
            **init_kwargs,
        )
    ps.initialize_model_parallel(tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
                                 context_parallel_size=cfg.parallel.context_parallel_size)


def seed_everything(seed: int) -> None:
    """Same seed on every rank for weights (Megatron splits TP weights after a common init)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down Megatron's groups and the default group; safe to call twice or on failure."""
    try:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_max(flag: bool) -> bool:
    """True on every rank if any rank says True (stop requests must be agreed on)."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
