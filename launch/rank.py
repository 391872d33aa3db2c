"""One training rank started by `srun` (slurm/train.sbatch), with no torchrun in between.

    srun ... python -m launch.rank TRAINER_MODULE --config CONFIG [key=value ...]

Slurm starts one task per rank, so the signals Slurm sends (SIGTERM on preemption or
`scancel`, SIGUSR1 forwarded by the batch shell before the time limit) reach the trainer
itself, which saves and exits 75 within the whole grace time; torchrun's agent would SIGKILL
its workers 30 s after forwarding SIGTERM. The exit status of every rank comes back through
srun, so the batch shell decides whether to requeue from exit codes, not from files.

This module turns Slurm's task variables into the ones `torch.distributed`'s env://
rendezvous reads (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK; MASTER_ADDR and
MASTER_PORT come from the batch shell), checks that the rendezvous address resolves and, on
ranks other than 0, that it accepts connections within RDZV_TIMEOUT seconds (default 600),
failing with a message that names the node and says what to set instead of retrying silently
until Slurm kills the job; then it replaces itself (exec) with `python -m TRAINER_MODULE`.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence

DEFAULT_RDZV_TIMEOUT = 600.0


class RendezvousError(RuntimeError):
    """The rendezvous address cannot be used from this node; the message says what to do."""


def rank_env(environ: Mapping[str, str]) -> Dict[str, str]:
    """torch.distributed's variables from Slurm's task variables (SLURM_PROCID, ...)."""
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR", "MASTER_PORT")
               if not environ.get(k)]
    if missing:
        raise RendezvousError(f"launch.rank runs under srun from slurm/train.sbatch; missing {', '.join(missing)}")
    local_world = environ.get("NPROC_PER_NODE") or environ.get("SLURM_NTASKS_PER_NODE") or "1"
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": local_world,
        "GROUP_RANK": environ.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": environ["MASTER_ADDR"],
        "MASTER_PORT": environ["MASTER_PORT"],
    }


def _hint(host: str, head: str) -> str:
    return (f"set RDZV_HOST to an address of the head node {head} that every node can reach (for example its "
            f"`hostname -I` address on the fast network: sbatch --export=ALL,RDZV_HOST=... or export it before "
            f"`launch submit`), or ask the admin to give the node a resolvable NodeAddr in slurm.conf")


def check_rendezvous(host: str, port: int, rank: int, node: str, head: str,
                     timeout: float = DEFAULT_RDZV_TIMEOUT, poll: float = 1.0) -> None:
    """Raise RendezvousError if `host` does not resolve here, or (rank > 0) accepts no
    connection on `port` within `timeout` seconds; rank 0 hosts the store and only resolves."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RendezvousError(f"rank {rank} on node {node}: the rendezvous host {host!r} does not resolve "
                              f"({e.strerror}); {_hint(host, head)}") from None
    if rank == 0:
        return
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(poll, 0.1))):
                return
        except OSError as e:
            last = e.strerror or str(e)
        if time.monotonic() >= deadline:
            raise RendezvousError(
                f"rank {rank} on node {node}: no rendezvous at {host}:{port} (head node {head}) after {timeout:g} s "
                f"(last error: {last}). Either rank 0 did not start (see its error above in this log) or this "
                f"node cannot reach {host}: {_hint(host, head)}; RDZV_TIMEOUT sets the wait")
        time.sleep(poll)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: python -m launch.rank TRAINER_MODULE [trainer arguments]", file=sys.stderr)
        return 2
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    try:
        env = rank_env(os.environ)
        check_rendezvous(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["RANK"]), node,
                         os.environ.get("RDZV_HEAD_NODE", env["MASTER_ADDR"]),
                         float(os.environ.get("RDZV_TIMEOUT", DEFAULT_RDZV_TIMEOUT)))
    except RendezvousError as e:
        print(f"launch.rank: error: {e}", file=sys.stderr, flush=True)
        return 1
    os.environ.update(env)
    sys.stdout.flush()
    # exec: the trainer keeps this pid, so Slurm's signals reach it directly
    os.execv(sys.executable, [sys.executable, "-m", args[0], *args[1:]])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
