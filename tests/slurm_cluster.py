"""A throw-away one-node Slurm cluster on this machine, for tests of the Slurm launch path.

`slurm_cluster(tmp_dir)` writes a slurm.conf into tmp_dir (no munge: auth/none, cred/none; no
cgroups: proctrack/linuxproc, task/none), starts `slurmctld` and `slurmd` on free ports, waits
until the node is idle and yields an environment (os.environ + SLURM_CONF) for the Slurm clients.
On exit it cancels every job and stops both daemons. Needs root (SlurmUser=root) and Debian's
slurm-wlm (`bash tools/install_slurm.sh`); `slurm_binaries_missing()` says what is absent so
tests can skip with that reason.

The node has CPUs=nproc and OverSubscribe=FORCE, so a job of 2 CPU ranks fits on a 2-core
machine; the one task per node that `slurm/train.sbatch` starts (torchrun) needs one CPU.
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
from typing import Dict, Iterator, List

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


def write_conf(root: Path, node: str, cpus: int, mem_mb: int, ctld_port: int, slurmd_port: int) -> Path:
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
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
KillWait=5
MinJobAge=300
MessageTimeout=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName={node} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""
    )
    return conf


def _mem_mb() -> int:
    try:
        total_kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        return max(1024, int(total_kb / 1024 * 0.8))
    except (OSError, StopIteration, ValueError):
        return 4096


def _wait_idle(env: Dict[str, str], node: str, timeout: float, logs: Path) -> None:
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        r = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], env=env, capture_output=True, text=True)
        state = r.stdout.strip()
        if r.returncode == 0 and state.startswith("idle"):
            return
        time.sleep(0.5)
    tail = "".join((logs / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log") if (logs / f).exists())
    raise RuntimeError(f"slurm node {node} not idle after {timeout}s (state {state!r}); logs:\n{tail}")


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
def slurm_cluster(root, timeout: float = 30.0) -> Iterator[Dict[str, str]]:
    """Start slurmctld + slurmd with their state under `root`; yield the clients' environment."""
    root = Path(root)
    node = socket.gethostname().split(".")[0]
    ctld_port, slurmd_port = free_ports(2)
    conf = write_conf(root, node, os.cpu_count() or 1, _mem_mb(), ctld_port, slurmd_port)
    env = dict(os.environ, SLURM_CONF=str(conf))
    # -D: stay in the foreground (we own the process); -c: clear state from earlier runs
    ctld = subprocess.Popen([_which("slurmctld"), "-D", "-c", "-f", str(conf)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    slurmd = subprocess.Popen([_which("slurmd"), "-D", "-c", "-f", str(conf)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_idle(env, node, timeout, root / "log")
        yield env
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
        time.sleep(1)
        _stop(root / "slurmd.pid", slurmd)
        _stop(root / "slurmctld.pid", ctld)


if __name__ == "__main__":  # manual check: python tests/slurm_cluster.py
    import tempfile

    with tempfile.TemporaryDirectory() as d, slurm_cluster(d) as e:
        print(subprocess.run(["sinfo"], env=e, capture_output=True, text=True).stdout)
        out = subprocess.run(["sbatch", "--wrap", "hostname", "-o", f"{d}/out"], env=e, capture_output=True, text=True)
        print(out.stdout, out.stderr)
        time.sleep(3)
        print(Path(d, "out").read_text() if Path(d, "out").exists() else "no output")
