"""Save and resume training state under run_dir/checkpoints.

One checkpoint, `checkpoints/iter_NNNNNNN/`:
    model/          Megatron dist_checkpointing, reshardable to any tp / cp / dp layout: model
                    weights (and carried memory) and the optimizer state laid out like them
                    (`optimizer.*` keys, see optimizer_state.py); every data-parallel rank
                    writes its share (fully parallel save)
    trainer/rank_RRRRR.pt   step, tokens, data position, RNG states of that rank
    config.yaml     the run's resolved config (what tools/convert_checkpoint.py builds from)
    meta.json       step, consumed tokens, parallel layout, model signature, optimizer step
                    and state keys, wandb id, tokenizer
    tokenizer/      a copy of the tokenizer's files (tokenizer.model or tokenizer.json), when given
    manifest.json   every file with size and checksum (written last)

The learning-rate schedule is a pure function of the step (training/schedule.py), so the step
is all of it that needs saving. Loading reads only the files the manifest lists, with
`torch.load(weights_only=True)` for ours; the pickles inside model/common.pt and deepspeed/
are what the Megatron and DeepSpeed formats require.

On a layout change (tensor-, context- or data-parallel size, ZeRO stage 0/1/2) weights and
optimizer state reshard; the data position is global and continues; per-rank RNG streams
cannot map onto other ranks, so every rank keeps the stream seeded from train.seed at start
(nothing in the model draws random numbers with dropout 0, the default).

Publishing is atomic: everything goes into `iter_NNNNNNN.tmp/`, the manifest is written, the
directory is renamed, and only then is `latest_checkpointed_iteration.txt` updated. A crash at
any point leaves the previous checkpoint as the latest complete one.
A background save (`save(..., background=True)`) stages the tensors at the step boundary and
writes them from a forked process per rank (Megatron's async save); `finish_pending` runs the
same publishing once every rank's writer is done.

Test hook: MEGATRON_INFINI_TEST_CRASH_AFTER=model|deepspeed|manifest makes rank 0 kill itself
with SIGKILL right after that phase of a save, before the rename, so tests can check that a
save cut short never looks complete ("deepspeed", kept for old scripts, is now the same point
as "model": DeepSpeed's own checkpoint is no longer written).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from . import layout
from . import manifest as mf
from . import optimizer_state as opt_state
from . import rng

TRACKER = "latest_checkpointed_iteration.txt"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


CRASH_HOOK = "MEGATRON_INFINI_TEST_CRASH_AFTER"


def _crash_point(phase: str) -> None:
    """Test hook (see the module docstring): die like a preempted node, mid-save."""
    if os.environ.get(CRASH_HOOK) == phase and _rank() == 0:
        print(f"[checkpoint] {CRASH_HOOK}={phase}: killing rank 0 mid-save", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


SAVE_DELAY_HOOK = "MEGATRON_INFINI_TEST_SAVE_DELAY"


def _save_delay() -> None:
    """Test hook (see the module docstring): a slow save on every rank, before publishing."""
    seconds = float(os.environ.get(SAVE_DELAY_HOOK) or 0)
    if seconds > 0:
        _info(f"{SAVE_DELAY_HOOK}={seconds:g}: sleeping {seconds:g} s before publishing")
        time.sleep(seconds)


def _write_fault(tmp: str, step: int) -> None:
    """Test hook MEGATRON_INFINI_FAULT=save_enospc[@STEP] (docs/faults.md): a full disk mid-save, every rank."""
    hooks = os.environ.get("MEGATRON_INFINI_FAULT", "").split(",")
    if "save_enospc" in hooks or f"save_enospc@{step}" in hooks:
        with open(os.path.join(tmp, "trainer", f"partial_{_rank():05d}.bin"), "wb") as fh:
            fh.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)


def iter_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _warn(msg: str) -> None:
    if _rank() == 0:
        print(f"[checkpoint] WARNING: {msg}", file=sys.stderr, flush=True)


def _info(msg: str) -> None:
    if _rank() == 0:
        print(f"[checkpoint] {msg}", file=sys.stderr, flush=True)


def complete_checkpoints(root: str) -> List[int]:
    """Steps of published checkpoint directories (with a manifest), newest first."""
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        m = _ITER_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, mf.MANIFEST)):
            steps.append(int(m.group(1)))
    return sorted(steps, reverse=True)


def read_tracker(root: str) -> Optional[int]:
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    return int(text) if text.isdigit() else None


def _write_tracker(root: str, step: int) -> None:
    tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(f"{step}\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))


def resolve_checkpoint(path: str) -> str:
    """A run directory, its checkpoints/ directory or one iter_ directory -> an iter_ directory."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, mf.MANIFEST)):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(root):
            step = read_tracker(root)
            steps = complete_checkpoints(root)
            if step is not None and os.path.isdir(iter_dir(root, step)):
                return iter_dir(root, step)
            if steps:
                return iter_dir(root, steps[0])
    raise FileNotFoundError(f"no checkpoint found at {path!r} (expected a run directory, its "
                            "checkpoints/ directory, or an iter_NNNNNNN directory)")


def dist_save(sharded: dict, path: str, parallel_group=None, background: bool = False):
    """`dist_checkpointing.save`; synchronous without Megatron's helper process, or (`background`)
    returning the async request, whose writes run in a forked process: schedule it on
    `compat.async_save_machinery(compat.async_save_strategy())[1]`, Megatron's own
    AsyncCallsQueue or, when a recent nvidia-resiliency-ext is installed (megatron-core >= 0.17),
    its AsyncCallsQueue.

    Megatron passes the write results of a save through a queue it creates on first use with a
    spawn-context multiprocessing Manager: a fresh interpreter (seconds per process), and one
    that outlives a rank killed mid-save. A synchronous save (always Megatron's own writer) uses
    that queue only inside this process, so an in-process queue does the same job.

    parallel_group: ranks holding replicas of the same tensors (the data-parallel group):
    Megatron's FullyParallelSaveStrategyWrapper deals the replicated tensors out over them,
    so each writes a share instead of data-parallel rank 0 writing everything.
    """
    import queue

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    from megatron_infini import compat

    kwargs = {}
    if background:  # the writer process reports through a queue shared across processes
        strategy_name = compat.async_save_strategy()
        if strategy_name is not None:
            kwargs["async_strategy"] = strategy_name
        results, _ = compat.async_save_machinery(strategy_name)
        if isinstance(getattr(results, "_results_queue", None), queue.Queue):
            results._results_queue = None  # Megatron makes its Manager queue
    else:
        results, _ = compat.async_save_machinery(None)  # the synchronous writer is Megatron's
        if getattr(results, "_results_queue", False) is None:  # not created yet
            results._results_queue = queue.Queue()
    strategy = get_default_save_sharded_strategy()
    if parallel_group is not None and dist.get_world_size(parallel_group) > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, parallel_group)
    return dist_checkpointing.save(sharded, path, sharded_strategy=strategy, async_sharded_save=background,
                                   **kwargs)


def dist_load(sharded: dict, path: str, parallel_group=None) -> dict:
    """`dist_checkpointing.load`; with `parallel_group`, each replica is read from storage by
    one rank of the group and exchanged (Megatron's FullyParallelLoadStrategyWrapper: broadcasts
    on GPU; on CPU, where those need CUDA, an all_gather_object)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    strategy = None
    if parallel_group is not None and dist.get_world_size(parallel_group) > 1:
        algo = "broadcast" if torch.cuda.is_available() else "gather_object"
        strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(path), parallel_group,
                                                    exchange_algo=algo)
    return dist_checkpointing.load(sharded, path, sharded_strategy=strategy)


def _dp_group():
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None
    return ps.get_data_parallel_group(with_context_parallel=True)


class CheckpointManager:
    """Owns run_dir/checkpoints: atomic save, verified resume, keep-last-K pruning.

    `model` is the bare Megatron module; `engine` the DeepSpeed engine wrapping it.
    `trainer_state()` returns this rank's small state (step, data position, ...);
    `load_trainer_state(state)` puts it back.
    """

    def __init__(self, run_dir: str, engine, model, keep_last: int, tp_size: int,
                 memory_in_checkpoint: Callable[[], bool] = lambda: False,
                 files: Optional[Dict[str, str]] = None):
        self.root = os.path.join(run_dir, "checkpoints")
        self.files = dict(files or {})  # copied into every checkpoint: name inside it -> source path
        self.engine, self.model = engine, model
        self.keep_last, self.tp_size = keep_last, tp_size
        self.memory_in_checkpoint = memory_in_checkpoint
        self.loaded_step: Optional[int] = None
        self.saved_steps: List[int] = []
        self.fresh_optimizer_at: Optional[int] = None  # step where a layout change reset the optimizer
        self._pending = None  # AsyncCallsQueue of background saves (Megatron's or NVRx's), made on first use

    def _zero3(self) -> bool:
        return getattr(self.engine, "zero_optimization_stage", lambda: 0)() == 3

    # ------------------------------------------------------------------ save

    def save(self, step: int, trainer_state: dict, meta: dict, background: bool = False) -> str:
        """Collective. Returns the published directory (with `background`, the directory it will
        be published as: the tensors are written by a forked process, and `finish_pending`
        publishes the checkpoint once every rank's writer is done)."""
        self.finish_pending(blocking=True)  # one save at a time, in order
        final = iter_dir(self.root, step)
        tmp = final + ".tmp"
        if _rank() == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)  # left by a crash during an earlier save
            os.makedirs(os.path.join(tmp, "trainer"))
        _barrier()

        optimizer_info, request = self._save_state(os.path.join(tmp, "model"), background)
        torch.save(trainer_state, os.path.join(tmp, "trainer", f"rank_{_rank():05d}.pt"))
        _write_fault(tmp, step)
        if _rank() == 0:
            self._write_meta(tmp, step, dict(meta, optimizer=optimizer_info))
        _save_delay()
        if request is None:
            _crash_point("model")
            _crash_point("deepspeed")  # (phase name kept: DeepSpeed's own checkpoint is no longer written)
            self._publish(step)
            return final
        if self._pending is None:
            from megatron_infini import compat

            _, calls_queue = compat.async_save_machinery(compat.async_save_strategy())
            self._pending = calls_queue(persistent=False)  # a forked writer per save, as Megatron's default
        request.add_finalize_fn(lambda: self._publish(step))
        self._pending.schedule_async_request(request)
        return final

    def finish_pending(self, blocking: bool = False) -> None:
        """Collective. Publish the background saves whose writers are done on every rank (all
        of them, waiting, with `blocking`)."""
        if self._pending is not None:
            self._pending.maybe_finalize_async_calls(blocking=blocking)

    def _publish(self, step: int) -> None:
        """Collective: manifest, rename, tracker, pruning."""
        final = iter_dir(self.root, step)
        tmp = final + ".tmp"
        _barrier()
        mf.write_manifest(tmp, {"step": step})
        _barrier()
        _crash_point("manifest")
        if _rank() == 0:
            if os.path.exists(final):  # re-saving the same step (e.g. after a resume)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_tracker(self.root, step)
            self._prune(step)
        _barrier()

    def _write_meta(self, tmp: str, step: int, meta: dict) -> None:
        full = dict(meta, step=step, **layout.parallel_layout(self.engine, self.tp_size),
                    vocab_size=getattr(self.model, "vocab_size", None),
                    model_signature=layout.model_signature(self.model))
        if self.fresh_optimizer_at is not None:
            full["fresh_optimizer_at_step"] = self.fresh_optimizer_at
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump(full, fh, indent=1)
        run_config = os.path.join(os.path.dirname(self.root), "config.yaml")
        if os.path.isfile(run_config):  # written by the trainer at start, after resolving
            shutil.copyfile(run_config, os.path.join(tmp, "config.yaml"))
        for name, src in self.files.items():  # e.g. tokenizer/tokenizer.model
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            shutil.copyfile(src, os.path.join(tmp, name))

    def _save_state(self, path: str, background: bool):
        """Weights and optimizer state, one fully parallel save. Returns the meta.json
        `optimizer` entry and Megatron's AsyncRequest (None when done synchronously)."""
        os.makedirs(path, exist_ok=True) if _rank() == 0 else None
        _barrier()
        with self._gathered():
            sharded = self._sharded_state()
            opt, info = opt_state.sharded_state(self.engine, self.model, sharded)
            sharded.update(opt)
            request = dist_save(sharded, path, _dp_group(), background=background and not self._zero3())
        return info, request

    def _sharded_state(self) -> dict:
        sharded = self.model.sharded_state_dict()
        if self.memory_in_checkpoint():
            from megatron_infini.streaming import memory_sharded_state_dict

            sharded.update(memory_sharded_state_dict(self.model))
        return sharded

    def _gathered(self, modify: bool = False):
        """ZeRO-3 partitions parameters: gather them around building the Megatron state (and,
        `modify`, partition rank 0's values again on exit: every rank loads the same)."""
        import contextlib

        if self._zero3():
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.model.parameters()),
                                                     modifier_rank=0 if modify else None)
        return contextlib.nullcontext()

    def _prune(self, newest: int) -> None:
        if self.keep_last <= 0:
            return
        self.saved_steps.append(newest)
        keep = set(complete_checkpoints(self.root)[: self.keep_last]) | {newest}
        if self.loaded_step is not None:
            # the checkpoint we resumed from stays until this run has published K newer ones
            # (newer directories from before the resume may be the corrupt ones we skipped)
            if len([s for s in self.saved_steps if s > self.loaded_step]) < self.keep_last:
                keep.add(self.loaded_step)
        for step in complete_checkpoints(self.root):
            if step not in keep:
                shutil.rmtree(iter_dir(self.root, step), ignore_errors=True)
        for name in os.listdir(self.root):  # stale temporaries of older steps
            if name.endswith(".tmp") and name != f"iter_{newest:07d}.tmp" and os.path.isdir(os.path.join(self.root, name)):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    # ------------------------------------------------------------------ load

    def candidates(self, resume: str) -> List[str]:
        """Directories to try, best first: the tracker's, then older complete ones."""
        if resume == "none":
            return []
        if resume != "auto":
            return [resolve_checkpoint(resume)]
        steps = complete_checkpoints(self.root)
        tracked = read_tracker(self.root)
        if tracked is not None and tracked in steps:
            steps.remove(tracked)
            steps.insert(0, tracked)
        return [iter_dir(self.root, s) for s in steps]

    def load(self, resume: str, allow_fresh_optimizer: bool) -> Optional[dict]:
        """Collective. Load the newest valid checkpoint; return this rank's trainer state and
        the checkpoint's meta, or None when there is nothing to resume from."""
        for path in self.candidates(resume):
            try:
                mf.verify(path)
            except mf.CheckpointCorrupt as e:
                if resume != "auto":
                    raise
                _warn(f"skipping corrupt checkpoint: {e}")
                continue
            return self._load_from(path, allow_fresh_optimizer)
        return None

    def _optimizer_plan(self, path: str, meta: dict, same: bool, allow_fresh_optimizer: bool) -> str:
        """How the optimizer state comes back: "sharded" (ours, any layout), "deepspeed" (DeepSpeed's
        own files, same layout only) or "fresh" (weights-only checkpoint, or allowed). Raises
        ValueError, naming why, for a state that cannot be resharded."""
        if meta.get("weights_only"):
            _info(f"{path} holds model weights only: starting at step 0 with a new optimizer state")
            return "fresh"
        info = meta.get("optimizer")
        saved_zero = meta.get("zero_stage")
        if info and info.get("format") == "sharded":
            return "sharded"
        elif (same and saved_zero == getattr(self.engine, "zero_optimization_stage", lambda: None)()
              and os.path.isdir(os.path.join(path, "deepspeed"))):
            return "deepspeed"
        else:
            why = ("it was written by an older version that kept the optimizer state only in DeepSpeed's "
                   "per-rank files, loadable only on the same layout and ZeRO stage")
        was = (f"TP {meta.get('tensor_model_parallel_size')} x CP {meta.get('context_parallel_size', 1)} on "
               f"{meta.get('world_size')} ranks, ZeRO {saved_zero}")
        now = layout.parallel_layout(self.engine, self.tp_size)
        now_s = (f"TP {now['tensor_model_parallel_size']} x CP {now['context_parallel_size']} on "
                 f"{now['world_size']} ranks, ZeRO {now['zero_stage']}")
        if not allow_fresh_optimizer:
            raise ValueError(f"checkpoint {path} ({was}; this run: {now_s}): its optimizer state cannot be resharded: "
                             f"{why}. Set checkpoint.allow_fresh_optimizer=true to continue with a new optimizer state")
        _warn(f"{path} ({was} -> {now_s}): model weights are resharded, the OPTIMIZER STATE IS NEW (Adam moments "
              f"restart from zero; checkpoint.allow_fresh_optimizer=true): {why}")
        self.fresh_optimizer_at = int(meta["step"])
        return "fresh"

    def _load_from(self, path: str, allow_fresh_optimizer: bool) -> dict:
        with open(os.path.join(path, "meta.json")) as fh:
            meta = json.load(fh)
        layout.check_signature(path, meta.get("model_signature"), layout.model_signature(self.model))
        now = layout.parallel_layout(self.engine, self.tp_size)
        same = layout.same_layout(meta, now)
        weights_only = bool(meta.get("weights_only"))  # imported by tools/convert_checkpoint.py
        plan = self._optimizer_plan(path, meta, same, allow_fresh_optimizer)
        if plan == "deepspeed":
            self.engine.load_checkpoint(os.path.join(path, "deepspeed"), tag="state",
                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        if plan != "deepspeed" or not self._zero3():
            # Model weights from the reshardable copy (DeepSpeed's ZeRO-3 files carry their own).
            with self._gathered(modify=True):
                sharded = self._sharded_state()
                state = dist_load(sharded, os.path.join(path, "model"), _dp_group())
                memory = {k: v for k, v in state.items() if k.startswith("infini_memory.")}
                weights = {k: v for k, v in state.items() if not k.startswith("infini_memory.")}
                self.model.load_state_dict(weights, strict=True)
            if memory:
                from megatron_infini.streaming import load_memory_state_dict

                load_memory_state_dict(self.model, memory)
            # ZeRO keeps its own fp32 copy of the weights: copy the loaded ones into it, or
            # the first step would write the initial weights back (bf16 runs then take the
            # saved fp32 master weights from the optimizer state).
            refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
            if refresh is not None and plan != "deepspeed":
                refresh()
        if plan == "sharded":
            read = lambda request: dist_load(request, os.path.join(path, "model"))  # noqa: E731
            with self._gathered():
                opt_state.load(self.engine, self.model, self.model.sharded_state_dict(), meta["optimizer"], read)
        if plan != "fresh":  # DeepSpeed's own counters (its checkpoint is not loaded)
            self.engine.global_steps = int(meta["step"])
            self.engine.micro_steps = int(meta["step"]) * self.engine.gradient_accumulation_steps()
        self.loaded_step = meta["step"]
        if weights_only:
            return {"trainer": {"step": 0, "consumed_tokens": 0, "data": {"consumed_samples": 0}},
                    "meta": meta, "path": path}
        rank_file = os.path.join(path, "trainer", f"rank_{_rank():05d}.pt")
        if not same or not os.path.isfile(rank_file):
            rank_file = os.path.join(path, "trainer", "rank_00000.pt")
        trainer_state = torch.load(rank_file, weights_only=True, map_location="cpu")
        if not same:
            trainer_state.pop("rng", None)  # per-rank RNG streams do not map onto a new layout
            _info(f"parallel layout changed: weights and optimizer state resharded; RNG streams stay as seeded "
                  f"at start (train.seed)")
        _info(f"resumed from {path} (step {meta['step']})")
        return {"trainer": trainer_state, "meta": meta, "path": path}


def restore_rng(trainer_state: dict) -> None:
    if "rng" in trainer_state:
        rng.restore(trainer_state["rng"])
