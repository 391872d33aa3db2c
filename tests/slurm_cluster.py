"""Throw-away Slurm clusters on this machine, for tests of the Slurm launch path.

`slurm_cluster(tmp_dir)`: one node named after this host, one partition `debug` with
OverSubscribe=FORCE. `slurm_cluster(tmp_dir, nodes=("n1", "n2"), grace_time=G)`: several nodes
on this one host, as on a cluster whose node names are Slurm aliases that do not resolve in DNS
(one `slurmd -N NAME` each, `NodeAddr=127.0.0.1`, a port per node, `%n` in the spool, pid and
log paths), and real preemption: `PreemptType=preempt/partition_prio`, partition `low` (default,
PriorityTier=1, PreemptMode=REQUEUE, GraceTime=G) and `high` (PriorityTier=2, PreemptMode=OFF),
no oversubscription, so a `high` job that needs a node's CPUs preempts the `low` job on it.

Each writes a slurm.conf into tmp_dir (no munge: auth/none, cred/none; no cgroups:
proctrack/linuxproc, task/none), starts `slurmctld` and the `slurmd`s on free ports, waits until
the nodes are idle and yields an environment (os.environ + SLURM_CONF) for the Slurm clients.
On exit it cancels every job and stops the daemons. Needs root (SlurmUser=root) and Debian's
slurm-wlm (`bash tools/install_slurm.sh`); `slurm_binaries_missing()` says what is absent so
tests can skip with that reason. Every node has CPUs=nproc.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "sacct")


def slurm_binaries_missing() -> List[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_ports(n: int) -> List[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def write_conf(root: Path, node: str, cpus: int, mem_mb: int, ctld_port: int, slurmd_port: int,
               nodes: Sequence[str] = (), node_ports: Sequence[int] = (), grace_time: int = 60,
               kill_wait: int = 5) -> Path:
    """slurm.conf for one node `node` (nodes empty) or for `nodes` on this host (node_ports)."""
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if nodes:
        per_node = "-%n"
        for n in nodes:
            (root / f"spool-{n}").mkdir(exist_ok=True)
        node_lines = "".join(f"NodeName={n} NodeHostname={node} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} "
                             f"RealMemory={mem_mb} State=UNKNOWN\n" for n, p in zip(nodes, node_ports))
        names = ",".join(nodes)
        partitions = (f"PreemptType=preempt/partition_prio\nPreemptMode=REQUEUE\n{node_lines}"
                      f"PartitionName=low Nodes={names} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
                      f"PreemptMode=REQUEUE GraceTime={grace_time} OverSubscribe=NO\n"
                      f"PartitionName=high Nodes={names} MaxTime=INFINITE State=UP PriorityTier=2 "
                      f"PreemptMode=OFF OverSubscribe=NO\n")
    else:
        per_node = ""
        partitions = (f"NodeName={node} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN\n"
                      f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4\n")
    conf = root / "slurm.conf"
    conf.write_text(
        f"""\
ClusterName=testcluster
SlurmctldHost={node}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
JobRequeue=1
KillWait={kill_wait}
MinJobAge=300
MessageTimeout=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool{per_node}
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd{per_node}.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd{per_node}.log
SlurmctldDebug=info
SlurmdDebug=info
{partitions}"""
    )
    return conf


def _mem_mb() -> int:
    try:
        total_kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        return max(1024, int(total_kb / 1024 * 0.8))
    except (OSError, StopIteration, ValueError):
        return 4096


def _wait_idle(env: Dict[str, str], nodes: Sequence[str], timeout: float, logs: Path) -> None:
    deadline = time.time() + timeout
    states: List[str] = []
    while time.time() < deadline:
        r = subprocess.run(["sinfo", "-h", "-N", "-n", ",".join(nodes), "-o", "%t"], env=env,
                           capture_output=True, text=True)
        states = r.stdout.split()
        # one line per node and partition
        if r.returncode == 0 and len(states) >= len(nodes) and all(s.startswith("idle") for s in states):
            return
        time.sleep(0.5)
    tail = "".join(f.read_text()[-2000:] for f in sorted(logs.glob("*.log")))
    raise RuntimeError(f"slurm nodes {nodes} not idle after {timeout}s (states {states!r}); logs:\n{tail}")


def _stop(pidfile: Path, proc: subprocess.Popen) -> None:
    pids = {proc.pid}
    with contextlib.suppress(OSError, ValueError):
        pids.add(int(pidfile.read_text().split()[0]))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def slurm_cluster(root, timeout: float = 30.0, nodes: Sequence[str] = (), grace_time: int = 60,
                  kill_wait: int = 5) -> Iterator[Dict[str, str]]:
    """Start slurmctld + slurmd(s) with their state under `root`; yield the clients' environment."""
    root = Path(root)
    host = socket.gethostname().split(".")[0]
    ctld_port, slurmd_port, *node_ports = free_ports(2 + len(nodes))
    conf = write_conf(root, host, os.cpu_count() or 1, _mem_mb(), ctld_port, slurmd_port, nodes, node_ports,
                      grace_time, kill_wait)
    env = dict(os.environ, SLURM_CONF=str(conf))
    # -D: stay in the foreground (we own the process); -c: clear state from earlier runs
    daemons = [(root / "slurmctld.pid", subprocess.Popen(
        [_which("slurmctld"), "-D", "-c", "-f", str(conf)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))]
    for name in nodes or (None,):
        args = ["-N", name] if name else []
        pidfile = root / (f"slurmd-{name}.pid" if name else "slurmd.pid")
        daemons.insert(0, (pidfile, subprocess.Popen(
            [_which("slurmd"), "-D", "-c", "-f", str(conf), *args], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)))
    try:
        _wait_idle(env, list(nodes) or [host], timeout, root / "log")
        yield env
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
        time.sleep(1)
        for pidfile, proc in daemons:  # slurmds first, slurmctld last
            _stop(pidfile, proc)


if __name__ == "__main__":  # manual check: python tests/slurm_cluster.py
    import tempfile

    with tempfile.TemporaryDirectory() as d, slurm_cluster(d) as e:
        print(subprocess.run(["sinfo"], env=e, capture_output=True, text=True).stdout)
        out = subprocess.run(["sbatch", "--wrap", "hostname", "-o", f"{d}/out"], env=e, capture_output=True, text=True)
        print(out.stdout, out.stderr)
        time.sleep(3)
        print(Path(d, "out").read_text() if Path(d, "out").exists() else "no output")
