"""`python -m launch` / `megatron-infini launch`: submit a training run to Slurm, or run it here.

    submit --config CONFIG [--nodes N] [--gpus-per-node G] [--procs-per-node P] [--partition P]
           [--time T] [--account A] [--dry-run] [key.sub=value ...]
        check the job (world size vs TP and batch, memory per GPU, shared run_dir), render
        slurm/train.sbatch into RUN_DIR/train.sbatch and `sbatch` it (--dry-run: print it).
        --gpus-per-node 0 runs CPU ranks (gloo), 2 per node unless --procs-per-node says otherwise.
    local --config CONFIG [--nproc N] [key.sub=value ...]
        torchrun --standalone on this machine.
    describe --config CONFIG [key.sub=value ...]
        print versions, the git commit and the resolved config (the sbatch job logs this at start).

Errors in the request exit with code 2 and a message saying what to change.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from launch.checks import LaunchError, check_job, default_procs_per_node, read_config

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "slurm" / "train.sbatch"
# the trainer torchrun starts; the tests point it at a stand-in while developing
DEFAULT_TRAINER = os.environ.get("MEGATRON_INFINI_TRAINER", "megatron_infini.train")


def _torchrun() -> str:
    beside = Path(sys.executable).parent / "torchrun"
    return str(beside) if beside.exists() else (shutil.which("torchrun") or "torchrun")


def render(template: str, values: Dict[str, object]) -> str:
    """Fill `{{name}}` placeholders; a placeholder without a value is an error, not a blank."""

    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"slurm template placeholder {{{{{m.group(1)}}}}} has no value")
        return str(values[m.group(1)])

    return re.sub(r"\{\{(\w+)\}\}", sub, template)


def sbatch_values(args, cfg, procs_per_node: int) -> Dict[str, object]:
    run_dir = os.path.abspath(cfg.run_dir)
    q = shlex.quote
    return {
        "job_name": q(args.job_name or f"infini-{os.path.basename(run_dir)}"),
        "nodes": args.nodes,
        "time": q(args.time),
        "run_dir": q(run_dir),
        "workdir": q(os.getcwd()),
        "signal_seconds": args.signal_seconds,
        "gpus_directive": f"#SBATCH --gpus-per-node={args.gpus_per_node}" if args.gpus_per_node > 0
        else "# CPU job (--gpus-per-node 0): gloo ranks",
        "partition_directive": f"#SBATCH --partition={q(args.partition)}" if args.partition else "# default partition",
        "account_directive": f"#SBATCH --account={q(args.account)}" if args.account else "# default account",
        "config": q(os.path.abspath(args.config)),
        "overrides": " ".join(q(o) for o in args.overrides),
        "procs_per_node": procs_per_node,
        "python": q(sys.executable),
        "torchrun": q(_torchrun()),
        "trainer_module": q(args.trainer_module),
        "max_restarts": args.max_restarts,
        "device_env": "" if args.gpus_per_node > 0 else "export CUDA_VISIBLE_DEVICES=  # CPU ranks\n",
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-infini launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--config", required=True, help="training config YAML")
        sp.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    s = sub.add_parser("submit", help="check, render slurm/train.sbatch into the run directory, sbatch it")
    common(s)
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU ranks (gloo)")
    s.add_argument("--procs-per-node", type=int, default=None, help="default: one per GPU, 2 on CPU nodes")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--time", default="24:00:00", help="Slurm time limit (default %(default)s)")
    s.add_argument("--job-name")
    s.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU for the estimate")
    s.add_argument("--signal-seconds", type=int, default=300,
                   help="SIGUSR1 this long before the time limit, to save and requeue (default %(default)s)")
    s.add_argument("--max-restarts", type=int, default=int(os.environ.get("MAX_RESTARTS", 3)),
                   help="requeue at most this many times (env MAX_RESTARTS; default %(default)s)")
    s.add_argument("--allow-local-run-dir", action="store_true",
                   help="accept a node-local run_dir (/tmp, /dev/shm, ...) for a multi-node job")
    s.add_argument("--skip-memory-check", action="store_true")
    s.add_argument("--trainer-module", default=DEFAULT_TRAINER, help=argparse.SUPPRESS)
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")

    loc = sub.add_parser("local", help="torchrun --standalone on this machine")
    common(loc)
    loc.add_argument("--nproc", type=int, default=2)
    loc.add_argument("--trainer-module", default=DEFAULT_TRAINER, help=argparse.SUPPRESS)

    d = sub.add_parser("describe", help="versions, git commit and the resolved config")
    common(d)
    return p


def submit(args) -> int:
    cfg = read_config(args.config, args.overrides)
    procs = default_procs_per_node(args.gpus_per_node, args.procs_per_node)
    notes = check_job(cfg, args.nodes, procs, args.gpus_per_node, args.gpu_memory_gb,
                      args.allow_local_run_dir, args.skip_memory_check)
    script = render(TEMPLATE.read_text(), sbatch_values(args, cfg, procs))
    if args.dry_run:
        print(script, end="")
        for n in notes:
            print(f"# launch: {n}", file=sys.stderr)
        return 0
    run_dir = Path(cfg.run_dir).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = run_dir / "train.sbatch"
    path.write_text(script)
    for n in notes:
        print(f"launch: {n}")
    print(f"launch: wrote {path}; log: {run_dir}/logs/slurm-<job id>.out")
    r = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r.returncode


def local(args) -> int:
    read_config(args.config, args.overrides)  # fail here, not in N ranks
    cmd = [_torchrun(), "--standalone", "--nproc-per-node", str(args.nproc),
           "-m", args.trainer_module, "--config", args.config, *args.overrides]
    print("launch: " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:
        return 130


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe(args) -> int:
    import platform

    import yaml

    cfg = read_config(args.config, args.overrides)
    print(f"python {platform.python_version()} ({sys.executable}) on {platform.node()}")
    print("versions: " + ", ".join(f"{d} {_version(d)}" for d in
                                   ("megatron-infini", "torch", "megatron-core", "deepspeed")))
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    print(f"git: {git.stdout.strip() or 'not a git checkout'}")
    data = __import__("dataclasses").asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else cfg
    print(f"resolved config ({args.config} {' '.join(args.overrides)}):")
    print(yaml.safe_dump(data, sort_keys=False), end="", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return {"submit": submit, "local": local, "describe": describe}[args.command](args)
    except (LaunchError, ValueError, FileNotFoundError) as e:  # bad request or config: no traceback
        print(f"launch {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
