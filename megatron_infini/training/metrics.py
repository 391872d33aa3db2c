"""Metrics on rank 0: run_dir/metrics.jsonl (every step), Weights & Biases, console progress.

wandb is optional: with `logging.wandb_mode=disabled` it is never imported; `offline` writes a
local run directory under run_dir/wandb that `wandb sync` uploads later. The W&B run id is kept
in run_dir/wandb_id so a resumed (or requeued) run continues the same W&B run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from typing import Any, Dict, Optional

from .config import Config, to_dict


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A one-line progress bar with ETA on a terminal; plain periodic lines in a log file."""

    def __init__(self, total: int, start: int, enabled: bool, stream=sys.stderr):
        self.total, self.start, self.enabled, self.stream = total, start, enabled, stream
        self.t0 = time.monotonic()
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()

    def update(self, step: int, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        done = step - self.start
        elapsed = time.monotonic() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("inf")
        frac = step / self.total if self.total else 1.0
        if self.tty:
            bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
            self.stream.write(f"\r[{bar}] {step}/{self.total} {text} eta {_fmt_time(eta)} ")
            if step >= self.total:
                self.stream.write("\n")
        elif force:
            self.stream.write(f"step {step}/{self.total} ({100 * frac:.0f}%) {text} eta {_fmt_time(eta)}\n")
        self.stream.flush()


class MetricsLogger:
    """Writes one JSON object per step; mirrors it to W&B when enabled. Rank 0 only."""

    def __init__(self, cfg: Config, rank: int, start_step: int, wandb_id: Optional[str] = None):
        self._wandb_id = wandb_id
        self.cfg, self.rank = cfg, rank
        self.active = rank == 0
        self.wandb_run = None
        self.fh = None
        self.progress = Progress(cfg.train.steps, start_step, self.active and cfg.logging.progress_bar)
        if not self.active:
            return
        os.makedirs(cfg.run_dir, exist_ok=True)
        path = os.path.join(cfg.run_dir, "metrics.jsonl")
        self._truncate_after(path, start_step)
        self.fh = open(path, "a")
        if cfg.logging.wandb_mode != "disabled":
            self._init_wandb()

    @staticmethod
    def _truncate_after(path: str, start_step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be run again)."""
        if not os.path.exists(path):
            return
        with open(path) as fh:
            lines = fh.readlines()
        kept = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= start_step or rec.get("kind") == "event":
                kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) != len(lines):
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                fh.writelines(kept)
            os.replace(tmp, path)

    def _init_wandb(self) -> None:
        import wandb  # optional dependency: imported only when enabled

        cfg = self.cfg
        id_file = os.path.join(cfg.run_dir, "wandb_id")
        if self._wandb_id:  # from the checkpoint we resumed from
            run_id = self._wandb_id
        elif os.path.exists(id_file):
            run_id = open(id_file).read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_file, "w") as fh:
                fh.write(run_id)
        self.wandb_run = wandb.init(
            project=cfg.logging.wandb_project,
            entity=cfg.logging.wandb_entity,
            name=cfg.logging.run_name or os.path.basename(os.path.abspath(cfg.run_dir)),
            id=run_id,
            resume="allow",
            dir=cfg.run_dir,
            mode=cfg.logging.wandb_mode,
            config=to_dict(cfg),
        )

    @property
    def wandb_id(self) -> Optional[str]:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": step, **metrics}
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        force = step % self.cfg.logging.log_interval == 0 or step == self.cfg.train.steps
        text = f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} {metrics.get('tokens_per_s', 0):.0f} tok/s"
        self.progress.update(step, text, force=force)

    def event(self, name: str, **fields) -> None:
        """A non-step record (resume, checkpoint, stop) kept in metrics.jsonl for the record."""
        if not self.active:
            return
        self.fh.write(json.dumps({"kind": "event", "event": name, "time": time.time(), **fields}) + "\n")
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
