"""The training loop: micro batches, optimizer steps, metrics, stop requests, checkpoints.

Legend: b micro batch, s sequence length, dp data-parallel size, tp tensor-parallel size.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_infini.checkpointing import CheckpointManager, restore_rng
from megatron_infini.checkpointing import rng as rng_state
from megatron_infini.data import SHAKESPEARE_TOKENIZER, SHAKESPEARE_TRAIN_PREFIX, SHAKESPEARE_VALID_PREFIX
from megatron_infini.data.blend import BlendedDataset, open_dataset, parse_blend
from megatron_infini.data.dataset import PackedDocumentDataset, check_vocab
from megatron_infini.data.preprocess import check_tokenizer, read_metadata
from megatron_infini.data.tokenizer import Tokenizer
from megatron_infini.flops import gpt_model_flops_per_step
from megatron_infini.layers.attention import set_memory_repeat, write_penalty
from megatron_infini.layers.compressive import reconstruction_loss, reconstruction_stats

from . import early_stop, exit_codes, faults
from .batches import batch_loss, model_kwargs, prepare_batch
from .config import Config, ConfigError, dump_yaml
from .distributed import all_reduce_max, seed_everything
from .engine import build_engine, use_bf16
from .metrics import MetricsLogger
from .model import build_model, ffn_size, padded_vocab_size
from .schedule import apply_lr
from .stats import gate_stats, memory_stats
from .watchdog import HangWatchdog


class StopRequest:
    """Set by SIGUSR1 / SIGTERM, the stop file, or the time limit; agreed across ranks."""

    def __init__(self, run_dir: str, exit_minutes: float):
        self.flag = False
        self.stop_file = os.path.join(run_dir, exit_codes.STOP_FILE)
        self.deadline = time.monotonic() + exit_minutes * 60 if exit_minutes > 0 else None
        self.reason = ""
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.flag = True
        self.reason = signal.Signals(signum).name

    def check(self) -> bool:
        local = self.flag
        if not local and os.path.exists(self.stop_file):
            local, self.reason = True, "stop file"
        if not local and self.deadline is not None and time.monotonic() > self.deadline:
            local, self.reason = True, "checkpoint.exit_duration_minutes"
        return all_reduce_max(local)

    def clear(self) -> None:
        if dist.get_rank() == 0 and os.path.exists(self.stop_file):
            os.remove(self.stop_file)


def resolve_data(cfg: Config):
    """Training and validation blends ([(weight, prefix)], see data.blend; [] for no validation)
    and the tokenizer path; the shipped corpus when none is given."""
    train = parse_blend(cfg.data.train_data) or [(1.0, str(SHAKESPEARE_TRAIN_PREFIX))]
    valid = parse_blend(cfg.data.valid_data) or ([] if cfg.data.train_data else [(1.0, str(SHAKESPEARE_VALID_PREFIX))])
    tokenizer = cfg.data.tokenizer or SHAKESPEARE_TOKENIZER
    return train, valid, str(tokenizer)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank = dist.get_rank()
        self.dp = cfg.check_world(dist.get_world_size())
        self.dp_rank = ps.get_data_parallel_rank()
        train_blend, valid_blend, tok_path = resolve_data(cfg)

        # Cheap checks first: data and tokenizer problems surface before any model is built.
        tokenizer = Tokenizer(tok_path)
        for _, prefix in train_blend + valid_blend:
            try:
                check_tokenizer(read_metadata(prefix), tokenizer, prefix)
            except ValueError as e:
                raise ConfigError(f"data.tokenizer {e}") from None
        self.tokenizer = tokenizer
        tp = cfg.parallel.tensor_model_parallel_size
        self.vocab_size = cfg.model.vocab_size or padded_vocab_size(tokenizer.vocab_size, tp)
        check_vocab(tokenizer.vocab_size, self.vocab_size)
        kw = dict(seq_length=cfg.train.seq_length, seed=cfg.data.seed, dp_rank=self.dp_rank,
                  dp_world_size=self.dp, model_vocab_size=self.vocab_size)
        self.train_data = open_dataset(train_blend, **kw)
        self.valid_data = open_dataset(valid_blend, shuffle=False, **kw) if valid_blend else None
        self.train_weights = None  # same windows as train_data (same document lengths and order)
        if cfg.data.train_loss_weights:
            self.train_weights = PackedDocumentDataset(cfg.data.train_loss_weights, **{**kw, "model_vocab_size": None})
            if not np.array_equal(self.train_weights.doc_lengths, self.train_data.doc_lengths):
                raise ConfigError(f"data.train_loss_weights {cfg.data.train_loss_weights!r} does not match "
                                  f"data.train_data {train_blend[0][1]!r}: document lengths differ")

        seed_everything(cfg.train.seed)
        self.model = build_model(cfg, self.vocab_size, bf16=use_bf16(cfg))
        self.engine, self.optimizer = build_engine(self.model, cfg, self.dp)
        self.grad_acc = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp)
        self.ckpt = CheckpointManager(cfg.run_dir, self.engine, self.model, cfg.checkpoint.keep_last, tp,
                                      files={f"tokenizer/{name}": path
                                             for name, path in tokenizer.source_files().items()})
        self.step = 0
        self.consumed_tokens = 0
        self.skipped_steps = 0  # non-finite steps not applied, over the whole run (kept in checkpoints)
        self.wandb_id: Optional[str] = None
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        m = cfg.model
        self.flops_per_step = gpt_model_flops_per_step(
            num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=ffn_size(m),
            num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups or m.num_attention_heads,
            vocab_size=self.vocab_size, seq_length=cfg.train.seq_length, batch=cfg.train.global_batch_size,
            segment_length=m.segment_length, update=m.memory_update, gated_mlp=m.activation == "swiglu",
            memory_enabled=m.memory_enabled, memory_layers=None if m.memory_layers is None else len(m.memory_layers),
            memory_free_window=(m.xl_memory_length or m.segment_length) if m.memory_free_attention == "xl" else 0,
        )

    # ----------------------------------------------------------------- state

    def trainer_state(self) -> dict:
        return {"step": self.step, "consumed_tokens": self.consumed_tokens, "skipped_steps": self.skipped_steps,
                "data": self.train_data.state_dict(), "rng": rng_state.capture()}

    def resume(self) -> None:
        early_stop.set_phase("loading a checkpoint")
        faults.maybe_delay_load()
        loaded = self.ckpt.load(self.cfg.checkpoint.resume, self.cfg.checkpoint.allow_fresh_optimizer)
        if loaded is None:
            return
        state = loaded["trainer"]
        self.step, self.consumed_tokens = int(state["step"]), int(state["consumed_tokens"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.train_data.load_state_dict(state["data"])
        if self.train_weights is not None:
            self.train_weights.consumed_samples = self.train_data.consumed_samples
        restore_rng(state)
        self.wandb_id = loaded["meta"].get("wandb_id")

    def save(self, logger: MetricsLogger, background: bool = False) -> None:
        t0 = time.perf_counter()
        faults.check_finite_weights(self.model, self.step)  # never save NaN weights
        try:
            path = self.ckpt.save(self.step, self.trainer_state(),
                                  {"wandb_id": logger.wandb_id, "consumed_tokens": self.consumed_tokens,
                                   "tokenizer": self.tokenizer.describe()},
                                  background=background and self.cfg.checkpoint.async_save)
        except OSError as e:
            latest = self.ckpt.candidates("auto")
            raise OSError(e.errno, f"checkpoint save at step {self.step} failed ({e}); nothing was published: "
                          f"the latest checkpoint is still {latest[0] if latest else 'none'}") from e
        logger.event("checkpoint", step=self.step, path=path, seconds=round(time.perf_counter() - t0, 3))

    # ------------------------------------------------------------------ steps

    def forward_loss(self, tokens: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean next-token loss of tokens [b, s + 1]; with weights [b, s + 1] (weight of each
        token as a label), sum(w * loss) / sum(w) over the sequence (training.batches)."""
        cp_group = ps.get_context_parallel_group() if self.cfg.parallel.context_parallel_size > 1 else None
        batch = prepare_batch(tokens, weights, self.cfg, self.tokenizer.eos_id, self.device, cp_group)
        per_token = self.engine(batch.inputs, batch.position_ids, None, labels=batch.labels,
                                **model_kwargs(batch))  # like labels: [b, s / cp] or [1, b * s / cp]
        return batch_loss(per_token, batch.loss_mask, cp_group)

    def _dp_mean(self, value: torch.Tensor) -> float:
        value = value.detach().clone().to(self.device)
        dist.all_reduce(value, group=ps.get_data_parallel_group(with_context_parallel=True))
        return value.item() / (self.dp * self.cfg.parallel.context_parallel_size)

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.valid_data is None:
            return None
        self.engine.eval()
        self.valid_data.consumed_samples = 0
        losses = [self.forward_loss(b) for b in self.valid_data.batches(self.cfg.train.micro_batch_size,
                                                                        self.cfg.train.eval_iters)]
        self.engine.train()
        return self._dp_mean(torch.stack(losses).mean())

    def train(self) -> int:
        cfg = self.cfg
        watchdog = HangWatchdog(cfg.run_dir, self.rank, dist.get_world_size(), cfg.train.hang_timeout_s,
                                cfg.train.hang_timeout_first_step_s, self.step).start()
        try:
            return self._train(watchdog)
        finally:
            watchdog.stop()

    def _train(self, watchdog: HangWatchdog) -> int:
        cfg = self.cfg
        guard = faults.NonFiniteGuard(self.model, cfg.train.max_consecutive_skips)
        self.resume()
        if self.rank == 0:
            dump_yaml(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        logger = MetricsLogger(cfg, self.rank, self.step, wandb_id=self.wandb_id)
        stop = StopRequest(cfg.run_dir, cfg.checkpoint.exit_duration_minutes)
        try:
            logger.event("start", step=self.step, world_size=dist.get_world_size(), dp=self.dp,
                         tp=cfg.parallel.tensor_model_parallel_size)
            batches = self.train_data.batches(cfg.train.micro_batch_size)
            weights = self.train_weights.batches(cfg.train.micro_batch_size) if self.train_weights is not None else None
            tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
            saved_at = self.step
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                lr = apply_lr(self.engine.optimizer, self.step, cfg.optimizer, cfg.train.steps)
                losses = []
                if cfg.model.memory_repeat_max > 1:  # the augmentation from model.memory_repeat_start on
                    on = self.step >= cfg.model.memory_repeat_start
                    set_memory_repeat(self.model, cfg.model.memory_repeat_max if on else 1)
                for micro in range(self.grad_acc):
                    loss = self.forward_loss(next(batches), next(weights) if weights is not None else None)
                    loss = faults.inject_nan(loss, self.step + 1, self.rank)  # test hook, off by default
                    aux = [reconstruction_loss(self.model)]  # compressive: trains the compressors only
                    penalty = write_penalty(self.model)  # model.memory_write_l1 (read every step: cleared on read)
                    if self.step >= cfg.model.memory_write_l1_start:
                        aux.append(penalty)
                    aux = [t for t in aux if t is not None]
                    self.engine.backward(loss + sum(aux) if aux else loss)
                    losses.append(loss.detach())
                    if micro + 1 < self.grad_acc:
                        self.engine.step()  # no update before the accumulation boundary
                skipped = guard.step(self.engine, losses)  # the update, unless non-finite on any rank
                self.skipped_steps += skipped
                self.step += 1
                self.consumed_tokens += tokens_per_step
                loss = self._dp_mean(torch.stack(losses).mean())
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                metrics: Dict[str, float] = {
                    "loss": loss, "lr": lr, "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                    "tokens_per_s": tokens_per_step / dt, "step_time_s": dt,
                    "tflops_per_gpu": self.flops_per_step / dt / dist.get_world_size() / 1e12,
                    "consumed_tokens": self.consumed_tokens, "peak_mem_gb": peak_memory_gb(),
                    "skipped_steps": self.skipped_steps,
                    **gate_stats(self.model), **memory_stats(self.model), **reconstruction_stats(self.model),
                }
                if isinstance(self.train_data, BlendedDataset):  # samples/<corpus>: global, so far
                    metrics.update(self.train_data.corpus_samples())
                if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                    metrics["val_loss"] = self.evaluate()
                logger.log(self.step, metrics)
                watchdog.beat(self.step)
                faults.maybe_stop_self(self.step, self.rank)  # test hook, off by default
                if guard.exhausted:
                    return self._nonfinite_stop(logger, guard)
                self.ckpt.finish_pending()  # publish background saves that are done
                if stop.check():
                    self.save(logger)
                    logger.event("stop", step=self.step, reason=stop.reason or "another rank")
                    logger.close()
                    if self.rank == 0:
                        with open(os.path.join(cfg.run_dir, exit_codes.REQUEUE_FILE), "w") as fh:
                            fh.write(f"step {self.step}: {stop.reason or 'stop requested'}\n")
                    stop.clear()
                    # nobody exits before everyone has saved and flushed: torchrun terminates
                    # the other workers as soon as one exits non-zero
                    dist.barrier()
                    return exit_codes.EXIT_REQUEUE
                interval = cfg.checkpoint.save_interval
                if interval and self.step % interval == 0 and self.step < cfg.train.steps:
                    self.save(logger, background=True)
                    saved_at = self.step
            if cfg.checkpoint.save_at_end and (saved_at != self.step or not self.ckpt.candidates("auto")):
                self.save(logger)
            self.ckpt.finish_pending(blocking=True)
            logger.event("done", step=self.step)
            if self.rank == 0 and os.path.exists(os.path.join(cfg.run_dir, exit_codes.REQUEUE_FILE)):
                os.remove(os.path.join(cfg.run_dir, exit_codes.REQUEUE_FILE))
            return exit_codes.EXIT_OK
        finally:
            logger.close()

    def _nonfinite_stop(self, logger: MetricsLogger, guard: faults.NonFiniteGuard) -> int:
        msg = (f"{guard.consecutive} steps in a row (up to step {self.step}) had a non-finite loss or gradient "
               f"(train.max_consecutive_skips={self.cfg.train.max_consecutive_skips}); none was applied. The run "
               "diverged: lower optimizer.lr, check the data, or resume from an earlier checkpoint. No checkpoint "
               "was written")
        self.ckpt.finish_pending(blocking=True)  # a background save of an earlier (finite) step
        logger.event("nonfinite_stop", step=self.step, consecutive=guard.consecutive)
        if self.rank == 0:
            print(f"megatron-infini train: stopping: {msg}", file=sys.stderr, flush=True)
        return exit_codes.EXIT_NONFINITE
