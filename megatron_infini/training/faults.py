"""Non-finite steps: detected on every rank, agreed on, never applied to the weights.

A step whose loss (any micro batch, any rank) or gradients (where this rank holds them before
the update) are not finite is skipped: the optimizer does not move the weights, its moments
or its step count, and the gradients are dropped. As in Megatron, the iteration still counts:
`step`, the data position and the learning-rate schedule (a function of `step`) advance, so a
skipped step consumes its batch. `skipped_steps` in metrics.jsonl counts the skips of the run.
After `train.max_consecutive_skips` skips in a row the trainer stops with EXIT_NONFINITE.

How the update is skipped with DeepSpeed: the boundary `engine.step()` runs as usual (it
clips, zeroes the gradients and keeps DeepSpeed's micro-step counters right for every ZeRO
stage), with the step of the wrapped torch optimizer replaced by a no-op for that call. ZeRO
copies its fp32 master weights back into the model after that step, and those did not
change. DeepSpeed's own counter (`global_steps`) advances like ours; on resume it is set from
the checkpoint's step.

Test hook (keep out of production configs): MEGATRON_INFINI_FAULT, a comma-separated list of
- `nan_loss@STEP` or `nan_loss@STEP:RANK`: the loss of step STEP (1-based, the step being run)
  is NaN on every rank or on rank RANK; `nan_loss@A-B` for steps A..B;
- `sigstop@STEP:RANK`: rank RANK stops itself (SIGSTOP) after step STEP (a hung rank);
- `save_enospc` or `save_enospc@STEP`: every rank fails the checkpoint writes (of step STEP)
  with OSError(ENOSPC) after writing part of them (a full disk; the hook is in
  checkpointing/manager.py);
- `load_delay@SECONDS`: sleep before reading a checkpoint (a slow load, to signal it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Iterable, List, Optional, Tuple

import torch
from .distributed import all_reduce_max

FAULT_ENV = "MEGATRON_INFINI_FAULT"


def injected(name: str) -> List[str]:
    """Arguments of the `name` entries of MEGATRON_INFINI_FAULT ("" for an entry without @)."""
    out = []
    for entry in filter(None, (e.strip() for e in os.environ.get(FAULT_ENV, "").split(","))):
        key, _, arg = entry.partition("@")
        if key == name:
            out.append(arg)
    return out


def _step_rank(arg: str) -> Tuple[int, int, Optional[int]]:
    """`A`, `A-B`, `A:R`, `A-B:R` -> (first step, last step, rank or None)."""
    steps, _, rank = arg.partition(":")
    first, _, last = steps.partition("-")
    return int(first), int(last or first), int(rank) if rank else None


def fault_at(name: str, step: int, rank: int) -> bool:
    for arg in injected(name):
        first, last, r = _step_rank(arg)
        if first <= step <= last and r in (None, rank):
            return True
    return False


def inject_nan(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """The test hook `nan_loss@...`: the loss made NaN (through the graph, so the gradients are NaN too)."""
    return loss * float("nan") if fault_at("nan_loss", step, rank) else loss


def maybe_stop_self(step: int, rank: int) -> None:
    """The test hook `sigstop@STEP:RANK`: this rank freezes, as a hung process does."""
    if fault_at("sigstop", step, rank):
        print(f"[fault] {FAULT_ENV}: rank {rank} stops itself (SIGSTOP) after step {step}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)


def maybe_delay_load() -> None:
    for arg in injected("load_delay"):
        import time

        time.sleep(float(arg))


def _not_finite(tensors: Iterable[torch.Tensor]) -> bool:
    norms = [torch.linalg.vector_norm(t.detach().float()) for t in tensors if t is not None and t.numel()]
    return bool(norms) and not bool(torch.isfinite(torch.stack(norms)).all())


@contextlib.contextmanager
def _optimizer_step_skipped(engine):
    """The wrapped torch optimizer's `step` is a no-op inside (DeepSpeed's ZeRO and bf16
    optimizers keep the torch optimizer as `.optimizer`; without ZeRO the engine holds it)."""
    base = engine.optimizer
    while not isinstance(base, torch.optim.Optimizer) and hasattr(base, "optimizer"):
        base = base.optimizer
    if not isinstance(base, torch.optim.Optimizer):
        raise RuntimeError(f"cannot skip a step: no torch optimizer inside {type(engine.optimizer).__name__}")
    base.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del base.step


class NonFiniteGuard:
    """Decides, on every rank alike, whether the step's update is applied."""

    def __init__(self, model: torch.nn.Module, max_consecutive: int):
        self.model, self.max_consecutive = model, max_consecutive
        self.skipped = 0  # in this run
        self.consecutive = 0

    def step(self, engine, losses: List[torch.Tensor]) -> bool:
        """The accumulation-boundary `engine.step()`; returns True when the update was skipped.
        Collective (one scalar all-reduce)."""
        local = _not_finite(losses) or _not_finite(p.grad for p in self.model.parameters())
        skip = all_reduce_max(local)
        if skip:
            with _optimizer_step_skipped(engine):
                engine.step()
        else:
            engine.step()
            # DeepSpeed's ZeRO optimizers also refuse a non-finite gradient norm themselves
            # (gradients they hold in their own buffers, out of our sight)
            skip = not engine.was_step_applied()
        self.skipped += skip
        self.consecutive = self.consecutive + 1 if skip else 0
        return skip

    @property
    def exhausted(self) -> bool:
        return self.max_consecutive > 0 and self.consecutive >= self.max_consecutive


def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    """Collective; raises on every rank when any rank holds a non-finite weight (before a save).
    Under ZeRO-3 a parameter's own tensor is an empty placeholder; this rank's partition is its
    `ds_tensor`, so that is what is checked (the all-reduce covers every partition)."""
    if all_reduce_max(_not_finite(getattr(p, "ds_tensor", p) for p in model.parameters())):
        raise FloatingPointError(f"non-finite weights at step {step}: not saving a checkpoint "
                                 "(the previous checkpoint stays the latest)")
