"""`python -m launch` / `megatron-infini launch`: submit a training run to Slurm, or run it here.

    submit --config CONFIG [--nodes N] [--gpus-per-node G] [--procs-per-node P] [--partition P]
           [--time T] [--account A] [--cpus-per-task C] [--mem M] [--exclusive] [--omp-threads T]
           [--grace-seconds S] [--write-gbps B] [--dry-run] [key.sub=value ...]
        check the job (world size vs TP and batch, memory per GPU, shared run_dir, checkpoint
        save time vs --signal-seconds / --grace-seconds), render slurm/train.sbatch into
        RUN_DIR/train.sbatch and `sbatch` it (--dry-run: print it). One Slurm task per rank.
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

from launch.checks import LaunchError, check_job, check_save_time, default_procs_per_node, read_config

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "slurm" / "train.sbatch"
# the trainer torchrun starts; the tests point it at a stand-in while developing
DEFAULT_TRAINER = os.environ.get("MEGATRON_INFINI_TRAINER", "megatron_infini.train")


def node_cpus(partition: Optional[str]) -> Optional[int]:
    """CPUs of the smallest node in the partition (the default one without --partition), from
    `sinfo`; None when Slurm cannot be asked (e.g. a dry run on a laptop)."""
    cmd = ["sinfo", "-h", "-N", "-o", "%c %P"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    cpus = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and (partition or fields[1].endswith("*")):
            cpus.append(int(fields[0]))
    return min(cpus) if cpus else None


def resources(args, procs_per_node: int) -> Dict[str, object]:
    """CPUs per rank, threads per rank, memory and exclusivity, as sbatch directives."""
    cpus = args.cpus_per_task
    if cpus is None:  # all of the node's CPUs, shared by its ranks
        total = node_cpus(args.partition)
        cpus = max(1, total // procs_per_node) if total else 0
    threads = args.omp_threads or cpus or 1
    mem = str(args.mem)
    if not re.fullmatch(r"\d+[KMGT]?", mem):
        raise LaunchError(f"--mem={mem!r}: give a size such as 0 (all of the node's memory), 200G or 500000M")
    return {
        "cpus_directive": f"#SBATCH --cpus-per-task={cpus}" if cpus else
        "# --cpus-per-task: not requested (no --cpus-per-task and sinfo gave no CPU count)",
        "mem_directive": f"#SBATCH --mem={mem}",
        "exclusive_directive": "#SBATCH --exclusive" if args.exclusive else "# nodes may be shared (--exclusive not asked)",
        "omp_threads": threads,
    }


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
        **resources(args, procs_per_node),
        "rank_exit_wait": args.rank_exit_wait,
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
    s.add_argument("--grace-seconds", type=int, default=None,
                   help="the partition's preemption GraceTime (or KillWait for scancel), if you know it: "
                        "warn when a checkpoint save does not fit in it")
    s.add_argument("--write-gbps", type=float, default=1.0,
                   help="checkpoint write bandwidth of the whole job in GB/s, for the save-time estimate "
                        "(default %(default)s)")
    s.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per rank (default: the node's CPUs from sinfo / ranks per node; 0: do not ask)")
    s.add_argument("--mem", default="0", help="memory per node (default 0: all of the node's memory), e.g. 500G")
    s.add_argument("--exclusive", action="store_true", help="ask for whole nodes (#SBATCH --exclusive)")
    s.add_argument("--omp-threads", type=int, default=None,
                   help="OMP_NUM_THREADS per rank (default: --cpus-per-task, else 1)")
    s.add_argument("--rank-exit-wait", type=int, default=60,
                   help="seconds srun waits after the first rank exits before killing the others, "
                        "so a dead rank ends the job within a minute (default %(default)s; ranks that "
                        "finish or stop on request leave together after a barrier)")
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
    if args.rank_exit_wait < 1:
        raise LaunchError(f"--rank-exit-wait={args.rank_exit_wait}: give at least 1 second")
    if args.write_gbps <= 0:
        raise LaunchError(f"--write-gbps={args.write_gbps:g}: give a bandwidth > 0")
    if args.cpus_per_task is not None and args.cpus_per_task < 0:
        raise LaunchError(f"--cpus-per-task={args.cpus_per_task}: give a count >= 1 (or 0: do not ask)")
    if args.omp_threads is not None and args.omp_threads < 1:
        raise LaunchError(f"--omp-threads={args.omp_threads}: give a count >= 1")
    notes = check_job(cfg, args.nodes, procs, args.gpus_per_node, args.gpu_memory_gb,
                      args.allow_local_run_dir, args.skip_memory_check)
    save_note, warnings = check_save_time(cfg, args.write_gbps, args.signal_seconds, args.grace_seconds)
    notes.append(save_note)
    for w in warnings:
        print(f"launch: warning: {w}", file=sys.stderr)
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
