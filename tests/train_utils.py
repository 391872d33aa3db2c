"""Run the real trainer in subprocesses (torchrun for several ranks), read what it wrote."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG_CONFIG = os.path.join(REPO, "configs", "debug.yaml")


@dataclass
class Run:
    returncode: int
    output: str
    run_dir: str

    @property
    def steps(self) -> List[dict]:
        return read_metrics(self.run_dir)

    @property
    def losses(self) -> List[float]:
        return [r["loss"] for r in self.steps]


def read_metrics(run_dir: str) -> List[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return [r for r in records if r.get("kind") != "event"]


def train(run_dir, *overrides, nproc: int = 2, config: str = DEBUG_CONFIG, timeout: float = 300,
          env: dict = None) -> Run:
    """`torchrun --nproc-per-node nproc -m megatron_infini.train`; for nproc=0 one process started as
    `python -m megatron_infini train` (the `megatron-infini train` console script)."""
    if nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                    "--standalone", "-m", "megatron_infini.train"]
    else:
        launcher = [sys.executable, "-m", "megatron_infini", "train"]
    cmd = launcher + ["--config", config, f"run_dir={run_dir}", "logging.progress_bar=false", *overrides]
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    full_env = dict(inherited, OMP_NUM_THREADS="1", WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"),
                    PYTHONWARNINGS="ignore")
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    return Run(proc.returncode, proc.stdout, str(run_dir))


def run_cli(*args, timeout: float = 300) -> str:
    """`python -m megatron_infini.cli ARGS` from the repository root; asserts success, returns the output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "megatron_infini.cli", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def readme_tour() -> List[List[str]]:
    """The commands of README.md's "five-minute tour", split as the shell would (comments dropped)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        block = re.search(r"## A five-minute tour\s+```bash\n(.*?)```", fh.read(), re.S)
    assert block, "README.md has no five-minute tour block"
    return [shlex.split(line) for line in block.group(1).splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
