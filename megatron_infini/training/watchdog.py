"""Hang detection: a watchdog thread per rank and heartbeat files in the run directory.

Every rank rewrites `run_dir/heartbeat/rank{R}` with the last step it completed and the time:
the training loop after each step (`beat(step)`), the watchdog thread every few seconds. When
no step completes within `train.hang_timeout_s` (`train.hang_timeout_first_step_s` for the
first step of a job, which compiles and warms up), every live rank prints the Python
stack of all its threads to its log (faulthandler), rank 0 reads the heartbeat files and names
the ranks that stopped writing (a frozen or dead process: its watchdog thread stopped too) and
the lowest step completed, then every live rank exits with EXIT_HANG. run_dir is on a shared
filesystem (launch refuses node-local run directories for multi-node jobs), so the files work
across nodes without a collective, which a hung rank could not answer.

Why our own thread and not nvidia-resiliency-ext's hang detection (0.7.0, read from its wheel:
it is published for Python >= 3.12 only, so it was not run here): its `RankMonitorClient`
sends heartbeats over an IPC socket to a `RankMonitorServer` process per rank that its own
launcher (`ft_launcher`, in place of torchrun) starts and announces in an environment
variable; without that launcher the client refuses to start. That does not fit one Slurm task
per rank (slurm/train.sbatch). A thread and a file per rank do what we need, on CPU and GPU,
with no dependency.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from typing import Dict, Optional

from . import exit_codes

HEARTBEAT_DIR = "heartbeat"


def read_heartbeats(run_dir: str) -> Dict[int, dict]:
    out = {}
    root = os.path.join(run_dir, HEARTBEAT_DIR)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith("rank") and name[4:].isdigit():
            try:
                with open(os.path.join(root, name)) as fh:
                    out[int(name[4:])] = json.load(fh)
            except (OSError, ValueError):
                continue  # being replaced right now
    return out


def describe_hang(beats: Dict[int, dict], world_size: int, now: float, stale_s: float) -> str:
    """Which ranks stopped reporting and where: one paragraph for rank 0's log."""
    beats = {r: b for r, b in beats.items() if r < world_size}  # files of a larger earlier job
    missing = [r for r in range(world_size) if r not in beats]
    stale = sorted(r for r, b in beats.items() if now - b["time"] > stale_s)
    steps = {r: b["step"] for r, b in beats.items()}
    low = min(steps.values()) if steps else None
    behind = sorted(r for r, s in steps.items() if s == low)
    lines = []
    if stale:
        lines.append("ranks that stopped reporting (frozen or dead): " + ", ".join(
            f"rank {r} on {beats[r]['host']} pid {beats[r]['pid']} (last heartbeat {now - beats[r]['time']:.0f} s ago, "
            f"step {beats[r]['step']})" for r in stale))
    if missing:
        lines.append(f"ranks with no heartbeat file: {missing}")
    if low is not None:
        lines.append(f"step {low + 1} never completed; ranks at step {low}: {behind if len(behind) < len(steps) else 'all'}")
    if not stale and not missing:
        lines.append("every rank's watchdog is alive: a collective or I/O is stuck (see the stacks above)")
    return "; ".join(lines)


class HangWatchdog:
    """Start with `start()`, call `beat(step)` after every step, `stop()` at the end."""

    def __init__(self, run_dir: str, rank: int, world_size: int, timeout_s: float, first_timeout_s: float,
                 step: int, interval_s: Optional[float] = None):
        self.run_dir, self.rank, self.world_size = run_dir, rank, world_size
        self.timeout_s, self.first_timeout_s = timeout_s, max(first_timeout_s, timeout_s)
        self.interval_s = interval_s or min(5.0, max(timeout_s / 6, 0.5))
        self.step, self.started_at = step, step
        self.last_progress = time.monotonic()
        self.path = os.path.join(run_dir, HEARTBEAT_DIR, f"rank{rank}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hang-watchdog", daemon=True)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> "HangWatchdog":
        if self.enabled:
            self._write()
            self._thread.start()
        return self

    def beat(self, step: int) -> None:
        self.step, self.last_progress = step, time.monotonic()
        if self.enabled:
            self._write_quietly()

    def _write_quietly(self) -> None:
        try:
            self._write()
        except OSError:
            pass  # a full or flaky filesystem must not kill training; the next beat retries

    def stop(self) -> None:
        self._stop.set()

    def _write(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"step": self.step, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()}, fh)
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write_quietly()
            allowed = self.first_timeout_s if self.step == self.started_at else self.timeout_s
            waited = time.monotonic() - self.last_progress
            if waited > allowed:
                self._fire(waited, allowed)

    def _fire(self, waited: float, allowed: float) -> None:
        print(f"[watchdog] rank {self.rank}: no step completed for {waited:.0f} s (limit {allowed:g} s, "
              f"train.hang_timeout_s{'/hang_timeout_first_step_s' if allowed != self.timeout_s else ''}); "
              f"last completed step {self.step}. Python stacks of all threads:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        if self.rank == 0:
            time.sleep(self.interval_s)  # let live ranks refresh their heartbeats once more
            report = describe_hang(read_heartbeats(self.run_dir), self.world_size, time.time(),
                                   stale_s=3 * self.interval_s)
            print(f"[watchdog] hang at step {self.step + 1}: {report}. Exiting {exit_codes.EXIT_HANG}; "
                  "a rerun resumes from the last checkpoint", file=sys.stderr, flush=True)
            try:
                with open(os.path.join(self.run_dir, exit_codes.HANG_FILE), "w") as fh:
                    fh.write(f"step {self.step + 1}: {report}\n")
            except OSError:
                pass
        os._exit(exit_codes.EXIT_HANG)

