"""Checks a job must pass before it is submitted; each failure says what to change.

`read_config` is the one place launch/ reads a training config (the trainer's own typed loader,
so launcher and trainer always agree); the checks only need its attributes.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

from launch.memory import checkpoint_bytes, estimate_memory_gb

# Paths that are private to one node (or wiped between jobs): a run directory there is not seen
# by the other nodes of a multi-node job. Override with --allow-local-run-dir.
NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/scratch/local", "/local", "/localscratch", "/mnt/local")


class LaunchError(ValueError):
    """A job that cannot run as asked; the message says what to change."""


def read_config(path: str, overrides: Sequence[str] = ()):
    """The training config with the command-line overrides applied (raises ValueError if bad)."""
    from megatron_infini.training.config import load_config

    return load_config(path, list(overrides))


def check_world(cfg, nodes: int, procs_per_node: int) -> int:
    """World size against tensor parallelism and batch sizes; return the data-parallel size."""
    world = nodes * procs_per_node
    tp = cfg.parallel.tensor_model_parallel_size
    cp = getattr(cfg.parallel, "context_parallel_size", 1)
    if world % (tp * cp):
        raise LaunchError(
            f"world size {world} ({nodes} node(s) x {procs_per_node} process(es)) is not divisible by "
            f"parallel.tensor_model_parallel_size={tp} x parallel.context_parallel_size={cp}: change "
            f"--nodes/--procs-per-node or the parallel sizes"
        )
    dp = world // (tp * cp)
    mb, gb = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if gb % (mb * dp):
        raise LaunchError(
            f"train.global_batch_size={gb} is not divisible by train.micro_batch_size={mb} x data-parallel "
            f"size {dp} (world {world} / TP {tp} / CP {cp}) = {mb * dp}: set train.global_batch_size to a "
            f"multiple of {mb * dp}, or change train.micro_batch_size or the number of ranks"
        )
    return dp


def check_memory(cfg, dp: int, gpu_memory_gb: float) -> float:
    """Refuse a job whose estimated per-GPU memory exceeds the GPUs'; return the estimate (GiB)."""
    precision = "fp32" if cfg.deepspeed.precision == "fp32" else "bf16"
    need = estimate_memory_gb(cfg.model, cfg.parallel, cfg.deepspeed.zero_stage, cfg.train.micro_batch_size,
                              cfg.train.seq_length, dp, precision)
    if need > gpu_memory_gb:
        raise LaunchError(
            f"estimated {need:.1f} GiB per GPU (launch/memory.py) exceeds --gpu-memory-gb={gpu_memory_gb:g}: "
            f"use more GPUs, raise parallel.tensor_model_parallel_size (with parallel.sequence_parallel=true) or "
            f"deepspeed.zero_stage (now {cfg.deepspeed.zero_stage}), lower train.micro_batch_size, or set "
            f"model.recompute_layers=true (or pass --skip-memory-check if the estimate is wrong)"
        )
    return need


def check_run_dir(run_dir: str, nodes: int, allow_local: bool = False) -> None:
    """A multi-node job needs a run directory every node can reach (no node-local path)."""
    if nodes <= 1 or allow_local:
        return
    path = os.path.realpath(os.path.abspath(run_dir))
    for prefix in NODE_LOCAL_PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            raise LaunchError(
                f"run_dir {path} is under {prefix}, which is local to each node; a {nodes}-node job needs a "
                f"shared filesystem path: set run_dir=... (or pass --allow-local-run-dir if {prefix} is shared)"
            )


def check_job(cfg, nodes: int, procs_per_node: int, gpus_per_node: int, gpu_memory_gb: float,
              allow_local_run_dir: bool = False, skip_memory_check: bool = False) -> List[str]:
    """Run every check; return notes worth printing (e.g. the memory estimate)."""
    notes: List[str] = []
    if nodes < 1 or procs_per_node < 1:
        raise LaunchError(f"--nodes ({nodes}) and --procs-per-node ({procs_per_node}) must be >= 1")
    if gpus_per_node > 0 and procs_per_node > gpus_per_node:
        raise LaunchError(f"--procs-per-node={procs_per_node} exceeds --gpus-per-node={gpus_per_node}: "
                          f"one process drives one GPU")
    dp = check_world(cfg, nodes, procs_per_node)
    notes.append(f"world size {nodes * procs_per_node} = TP {cfg.parallel.tensor_model_parallel_size} x DP {dp}")
    if gpus_per_node > 0 and not skip_memory_check:
        need = check_memory(cfg, dp, gpu_memory_gb)
        notes.append(f"estimated memory {need:.1f} GiB per GPU (of {gpu_memory_gb:g})")
    check_run_dir(cfg.run_dir, nodes, allow_local_run_dir)
    return notes


def check_save_time(cfg, write_gbps: float, signal_seconds: int,
                    grace_seconds: Optional[int] = None) -> Tuple[str, List[str]]:
    """Estimated checkpoint save time (size from the config over `write_gbps` GB/s) against the
    time the job gets to save: --signal-seconds before the time limit, and the preemption
    grace time if declared. Returns (note, warnings)."""
    precision = "fp32" if cfg.deepspeed.precision == "fp32" else "bf16"
    size = checkpoint_bytes(cfg.model, precision)
    seconds = size / (write_gbps * 1e9)
    note = f"estimated checkpoint {size / 1e9:.3g} GB, {seconds:.3g} s to save at {write_gbps:g} GB/s (--write-gbps)"
    warnings = []
    # a stop is acted on after the step in flight: leave room for one step and the exit
    for name, budget in (("--signal-seconds", signal_seconds), ("--grace-seconds", grace_seconds)):
        if budget is not None and seconds > budget:
            warnings.append(
                f"{note} does not fit in {name}={budget}: a stop there loses the work since the last periodic "
                f"save; raise {name} (or ask for a longer GraceTime / KillWait), set checkpoint.save_interval, "
                f"or pass --write-gbps if your filesystem is faster")
    return note, warnings


def default_procs_per_node(gpus_per_node: int, procs_per_node: Optional[int]) -> int:
    """One process per GPU; on CPU nodes (--gpus-per-node 0) two gloo ranks unless told otherwise."""
    if procs_per_node is not None:
        return procs_per_node
    return gpus_per_node if gpus_per_node > 0 else 2
