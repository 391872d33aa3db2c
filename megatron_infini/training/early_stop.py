"""SIGTERM / SIGUSR1 before the training loop: exit at once with EXIT_REQUEUE, writing nothing.

Installed as the first thing the entry point does (this module imports nothing heavy), so a
preemption while importing, building the model or loading a checkpoint ends every rank in
well under a second instead of being ignored until the first step (or killed mid-load by the
scheduler). No checkpoint is written: there is nothing new to save, and the last complete
checkpoint stays the latest. The training loop replaces this handler with its own (a save,
then EXIT_REQUEUE).
"""

from __future__ import annotations

import os
import signal
import sys

from .exit_codes import EXIT_REQUEUE, REQUEUE_FILE

_state = {"phase": "starting", "run_dir": None}


def install() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handler)


def set_phase(phase: str, run_dir: str = None) -> None:
    """What the process is doing (named in the exit message); run_dir once it is known."""
    _state["phase"] = phase
    if run_dir is not None:
        _state["run_dir"] = run_dir


def _handler(signum, frame) -> None:
    rank = os.environ.get("RANK", "0")
    name = signal.Signals(signum).name
    print(f"megatron-infini train [rank {rank}]: {name} while {_state['phase']} (before the first step): "
          f"exiting {EXIT_REQUEUE} without a checkpoint; the last checkpoint stays the latest",
          file=sys.stderr, flush=True)
    run_dir = _state["run_dir"]
    if rank == "0" and run_dir and os.path.isdir(run_dir):
        try:
            with open(os.path.join(run_dir, REQUEUE_FILE), "w") as fh:
                fh.write(f"{name} while {_state['phase']}\n")
        except OSError:
            pass
    os._exit(EXIT_REQUEUE)
