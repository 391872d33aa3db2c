"""Run a function in N gloo processes on this machine (CPU distributed tests).

    def check(rank, world_size, path):       # module-level, so spawn can pickle it
        ...                                  # process group and Megatron groups are up
        return {"loss": 1.0}                 # optional, must pickle

    results = run_distributed(check, 2, "/tmp/x", tp=2)   # [result of rank 0, rank 1]

Each child: MASTER_ADDR/PORT on a free local port, one torch thread, `init_process_group`
("gloo"), `ensure_cpu_compat()`, `parallel_state.initialize_model_parallel(tp, ...)` unless
`tp=None`; always `destroy_model_parallel()` and `destroy_process_group()` at the end. An
exception in any child fails the caller with the child's traceback
(`torch.multiprocessing.ProcessRaisedException`). Inside the function,
`reinit_model_parallel(tp=...)` switches to another parallel layout in the same processes.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from typing import Any, Callable, List, Optional

import torch
import torch.multiprocessing as mp
from torch.testing import assert_close


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reinit_model_parallel(tp: int = 1, **kwargs) -> None:
    """Tear down Megatron's parallel groups and build them again with `tp` (and kwargs)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, **kwargs)


def _child(rank, fn, world_size, port, tp, mp_kwargs, args, out_dir):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from megatron_infini.compat import ensure_cpu_compat

        ensure_cpu_compat()
        if tp is not None:
            reinit_model_parallel(tp, **mp_kwargs)
        result = fn(rank, world_size, *args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        finally:
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    tp: Optional[int] = 1,
    timeout_s: float = 600.0,
    **model_parallel_kwargs: Any,
) -> List[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; return their results.

    tp: tensor-parallel size for `initialize_model_parallel` (None: no Megatron groups).
    model_parallel_kwargs: more `initialize_model_parallel` arguments.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _child,
            args=(fn, world_size, free_port(), tp, model_parallel_kwargs, args, out_dir),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        start = time.monotonic()
        while not ctx.join(timeout=5):
            if time.monotonic() - start > timeout_s:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"run_distributed: {fn.__name__} took more than {timeout_s} s")
        results = []
        for r in range(world_size):
            with open(os.path.join(out_dir, f"rank{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def gather_full(t, p):
    """The full tensor of a (possibly tensor-parallel) parameter: Megatron's split, any stride."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    dim, stride = p.partition_dim, p.partition_stride
    chunks = [part.chunk(stride, dim=dim) for part in parts]
    return torch.cat([chunks[r][j] for j in range(stride) for r in range(tp)], dim=dim)


def full_logits(model, ids):
    """Full-vocabulary logits [b, s, V] of a GPTModel (gathered across tensor-parallel ranks)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        out = model(ids, pos, None)  # [b, s, V / tp]
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return out
    parts = [torch.empty_like(out) for _ in range(tp)]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


#: Tolerance of the distributed equivalence tests (float32, reductions in different orders).
TOL = dict(rtol=1e-4, atol=1e-5)


def assert_same(res, ref, what):
    """Two runs' dict(loss, logits, grads={name: full tensor}) agree within TOL."""
    assert_close(res["loss"], ref["loss"], **TOL, msg=f"{what}: loss")
    assert_close(res["logits"], ref["logits"], **TOL, msg=f"{what}: logits")
    assert res["grads"].keys() == ref["grads"].keys(), what
    for n in ref["grads"]:
        assert_close(res["grads"][n], ref["grads"][n], **TOL, msg=lambda m: f"{what}: grad {n}\n{m}")
