"""The Slurm launch path: `python -m launch submit` checks, rendering, the rank wrapper's
rendezvous errors, and real jobs on a local two-node Slurm cluster (tests/slurm_cluster.py:
nodes n1, n2 on this host whose names do not resolve, NodeAddr=127.0.0.1, real preemption
between partitions `low` and `high`), one CPU rank per node.

The jobs that test the trainer's side (a checkpoint saved in the grace time, resume at the
preempted step) run `megatron_infini.train` on configs/debug.yaml; the ones that test only the
launcher's decisions (scancel, a crash, a dead rank) run tests/fixtures/standin_trainer.py,
which follows the same contract and starts in seconds. MEGATRON_INFINI_TEST_TRAINER=standin
(or a module name) runs all of them against that trainer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch.checks import LaunchError, check_job, check_run_dir, check_save_time, check_world, read_config
from launch.memory import checkpoint_bytes, count_parameters, estimate_memory_gb

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

DEBUG_CFG = {  # used when configs/debug.yaml does not exist yet
    "run_dir": "runs/debug",
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "segment_length": 64},
    "parallel": {"tensor_model_parallel_size": 1},
    "train": {"steps": 6, "micro_batch_size": 2, "global_batch_size": 4, "seq_length": 128},
    "logging": {"wandb_mode": "disabled"},
}


def _trainer(default: str = "megatron_infini.train") -> tuple:
    """(module, extra env) of the trainer the jobs run."""
    name = os.environ.get("MEGATRON_INFINI_TEST_TRAINER", "")
    if not name and importlib.util.find_spec(default) is not None:
        name = default
    if name in ("", "standin", "standin_trainer"):
        return "standin_trainer", {"PYTHONPATH": os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")])}
    return name, {}


@pytest.fixture
def config(tmp_path) -> Path:
    src = REPO / "configs" / "debug.yaml"
    if src.exists():
        return src
    path = tmp_path / "debug.yaml"
    path.write_text(yaml.safe_dump(DEBUG_CFG))
    return path


def launch(*args, env=None, check=False) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "launch", *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


# --------------------------------------------------------------------------- checks, no Slurm


def test_world_size_must_divide_by_tp(config):
    cfg = read_config(str(config), ["parallel.tensor_model_parallel_size=2"])
    with pytest.raises(LaunchError, match="not divisible by parallel.tensor_model_parallel_size=2"):
        check_world(cfg, nodes=1, procs_per_node=3)
    assert check_world(cfg, nodes=2, procs_per_node=2) == 2


def test_global_batch_must_divide_by_micro_batch_times_dp(config):
    cfg = read_config(str(config), ["train.micro_batch_size=2", "train.global_batch_size=6"])
    with pytest.raises(LaunchError, match=r"global_batch_size=6 .* = 4"):
        check_world(cfg, nodes=1, procs_per_node=2)


def test_memory_estimate_refuses_a_model_too_big_for_the_gpus(config):
    big = ["model.num_layers=32", "model.hidden_size=4096", "model.num_attention_heads=32",
           "model.num_query_groups=8", "model.ffn_hidden_size=14336", "model.vocab_size=128256",
           "model.segment_length=1024", "train.seq_length=8192", "train.micro_batch_size=1",
           "train.global_batch_size=32", "run_dir=/shared/runs/big"]  # a shared path, wherever the repo is
    cfg = read_config(str(config), big)
    assert 7.9e9 < count_parameters(cfg.model) < 8.1e9  # Llama 3 8B
    with pytest.raises(LaunchError, match="exceeds --gpu-memory-gb=80"):
        check_job(cfg, nodes=4, procs_per_node=8, gpus_per_node=8, gpu_memory_gb=80)
    ok = read_config(str(config), big + ["parallel.tensor_model_parallel_size=4", "parallel.sequence_parallel=true"])
    notes = check_job(ok, nodes=4, procs_per_node=8, gpus_per_node=8, gpu_memory_gb=80)
    assert any("estimated memory" in n for n in notes)
    # more sharding never needs more memory
    m, p = ok.model, ok.parallel
    est = [estimate_memory_gb(m, p, z, 1, 8192, 8) for z in (0, 1, 2, 3)]
    assert est == sorted(est, reverse=True)


def test_node_local_run_dir_refused_for_multi_node_jobs():
    with pytest.raises(LaunchError, match="local to each node"):
        check_run_dir("/tmp/run", nodes=2)
    with pytest.raises(LaunchError, match="/dev/shm"):
        check_run_dir("/dev/shm/x", nodes=4)
    check_run_dir("/tmp/run", nodes=1)
    check_run_dir("/tmp/run", nodes=2, allow_local=True)
    check_run_dir("/shared/project/run", nodes=2)


def test_submit_errors_exit_2_without_traceback(config, tmp_path):
    r = launch("submit", "--config", config, "--gpus-per-node", 0, "--procs-per-node", 3, "--dry-run",
               "parallel.tensor_model_parallel_size=2", f"run_dir={tmp_path}/r")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--procs-per-node" in r.stderr
    r = launch("submit", "--config", config, "--nodes", 2, "--gpus-per-node", 0, "--dry-run", "run_dir=/tmp/x")
    assert r.returncode == 2 and "--allow-local-run-dir" in r.stderr
    r = launch("submit", "--config", config, "--dry-run", "trian.steps=3")
    assert r.returncode == 2 and "train" in r.stderr and "Traceback" not in r.stderr


def test_dry_run_renders_the_sbatch_script(config, tmp_path):
    r = launch("submit", "--config", config, "--nodes", 4, "--gpus-per-node", 8, "--partition", "gpu",
               "--time", "2:00:00", "--account", "proj", "--dry-run", "--skip-memory-check", "--allow-local-run-dir",
               "--cpus-per-task", 12, "--mem", "500G", "--exclusive", "--omp-threads", 4,
               f"run_dir={tmp_path}/run", "train.steps=7", "train.global_batch_size=64", "data.train_data=/data/a b",
               check=True)
    s = r.stdout
    assert "{{" not in s and "}}" not in s
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --mem=500G", "#SBATCH --exclusive",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=2:00:00",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@", f"#SBATCH --output={tmp_path}/run/logs/slurm-%j.out",
                 f"RUN_DIR={tmp_path}/run", "NPROC_PER_NODE=8", "-m launch.rank", "export PYTHONUNBUFFERED=1",
                 "OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}", "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}",
                 "RANK_EXIT_WAIT=${RANK_EXIT_WAIT:-60}", "trap on_term TERM", "NodeAddr"):
        assert line in s, line
    assert "torchrun" not in s.split("#SBATCH --job-name")[1]  # srun starts the ranks themselves
    assert "OVERRIDES=(" in s and "'data.train_data=/data/a b'" in s and "train.steps=7" in s
    assert "CUDA_VISIBLE_DEVICES=" not in s
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    script = tmp_path / "x.sbatch"
    script.write_text(s)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    cpu = launch("submit", "--config", config, "--gpus-per-node", 0, "--dry-run", "--cpus-per-task", 3,
                 f"run_dir={tmp_path}/run", check=True).stdout
    assert "NPROC_PER_NODE=2" in cpu and "export CUDA_VISIBLE_DEVICES=" in cpu and "#SBATCH --gpus-per-node" not in cpu
    assert "#SBATCH --cpus-per-task=3" in cpu and "#SBATCH --mem=0" in cpu and "#SBATCH --exclusive" not in cpu
    assert "OMP_NUM_THREADS=${OMP_NUM_THREADS:-3}" in cpu
    for bad, flag in ((["--mem", "lots"], "--mem"), (["--cpus-per-task", -1], "--cpus-per-task"),
                      (["--omp-threads", 0], "--omp-threads"), (["--write-gbps", 0], "--write-gbps")):
        r = launch("submit", "--config", config, "--gpus-per-node", 0, "--dry-run", *bad, f"run_dir={tmp_path}/r")
        assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr, r.stderr


EIGHT_B = ["model.num_layers=32", "model.hidden_size=4096", "model.num_attention_heads=32",
           "model.num_query_groups=8", "model.ffn_hidden_size=14336", "model.vocab_size=128256"]


def test_save_time_estimate_warns_when_a_save_does_not_fit(config, tmp_path):
    cfg = read_config(str(config), EIGHT_B)
    params = count_parameters(cfg.model)
    # weights 2 + DeepSpeed's module copy 2 + fp32 master 4 + Adam m, v 8 bytes per parameter
    assert checkpoint_bytes(cfg.model) == params * (2 + 2 + 4 + 8)
    assert 120e9 < checkpoint_bytes(cfg.model) < 135e9  # an 8B checkpoint with optimizer state
    note, warnings = check_save_time(cfg, write_gbps=1.0, signal_seconds=300)
    assert "128 GB" in note and warnings == []  # ~128 s fits in 300 s
    _, warnings = check_save_time(cfg, write_gbps=1.0, signal_seconds=300, grace_seconds=60)
    assert len(warnings) == 1 and "--grace-seconds=60" in warnings[0]
    _, warnings = check_save_time(cfg, write_gbps=0.25, signal_seconds=300, grace_seconds=60)
    assert len(warnings) == 2  # 512 s fits in neither
    _, warnings = check_save_time(cfg, write_gbps=10.0, signal_seconds=300, grace_seconds=60)
    assert warnings == []
    r = launch("submit", "--config", config, "--nodes", 4, "--gpus-per-node", 8, "--dry-run", "--skip-memory-check",
               "--grace-seconds", 30, "--cpus-per-task", 8, "--allow-local-run-dir", f"run_dir={tmp_path}/run", "train.global_batch_size=64",
               *EIGHT_B, check=True)
    assert "launch: warning: estimated checkpoint" in r.stderr and "--grace-seconds=30" in r.stderr


def _run_rank(env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RDZV_"))}
    return subprocess.run([sys.executable, "-m", "launch.rank", "json.tool", "--help"], cwd=REPO,
                          env=dict(base, **env), capture_output=True, text=True, timeout=timeout)


def test_rank_wrapper_fails_fast_with_a_hint_when_the_rendezvous_is_unusable():
    from slurm_cluster import free_ports

    task = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURMD_NODENAME": "n2",
            "RDZV_HEAD_NODE": "n1"}
    # a Slurm node name that does not resolve, as on clusters whose names are aliases
    r = _run_rank(dict(task, MASTER_ADDR="n1.invalid", MASTER_PORT="29500"))
    assert r.returncode == 1, r.stderr
    assert "rank 1 on node n2" in r.stderr and "'n1.invalid' does not resolve" in r.stderr
    assert "set RDZV_HOST" in r.stderr and "Traceback" not in r.stderr
    # resolves, but nobody listens: rank 0 never started, or the network is not the right one
    (port,) = free_ports(1)
    t0 = time.time()
    r = _run_rank(dict(task, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RDZV_TIMEOUT="2"))
    assert r.returncode == 1 and time.time() - t0 < 30, r.stderr
    assert f"no rendezvous at 127.0.0.1:{port} (head node n1) after 2 s" in r.stderr and "RDZV_HOST" in r.stderr
    # reachable: the wrapper sets torch.distributed's variables and execs the trainer module
    import socket

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        r = _run_rank(dict(task, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(srv.getsockname()[1])))
    assert r.returncode == 0 and "json.tool" in r.stdout + r.stderr, r.stderr
    r = _run_rank({})
    assert r.returncode == 1 and "missing SLURM_PROCID" in r.stderr


def test_submit_writes_the_script_into_the_run_dir_and_calls_sbatch(config, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/sbatch_args\necho 'Submitted batch job 42'\n")
    (fake / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    r = launch("submit", "--config", config, "--gpus-per-node", 0, f"run_dir={tmp_path}/run", env=env, check=True)
    assert "Submitted batch job 42" in r.stdout
    assert (tmp_path / "sbatch_args").read_text().strip() == f"{tmp_path}/run/train.sbatch"
    assert "srun" in (tmp_path / "run" / "train.sbatch").read_text()


# --------------------------------------------------------------------------- real jobs on local Slurm

GRACE_TIME = 90  # the `low` partition's preemption GraceTime: longer than a 31 s save
KILL_WAIT = 40  # SIGTERM -> SIGKILL on scancel
RANK_EXIT_WAIT = 20  # srun --wait: a dead rank ends the job this long after it died


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from slurm_cluster import slurm_binaries_missing, slurm_cluster

    missing = slurm_binaries_missing()
    if missing:
        pytest.skip(f"Slurm binaries missing ({', '.join(missing)}): run `bash tools/install_slurm.sh`")
    if os.geteuid() != 0:
        pytest.skip("the local test cluster runs slurmd as root (SlurmUser=root)")
    root = tmp_path_factory.mktemp("slurm")
    with slurm_cluster(root, nodes=("n1", "n2"), grace_time=GRACE_TIME, kill_wait=KILL_WAIT) as env:
        yield dict(env, WANDB_MODE="disabled", OMP_NUM_THREADS="1")


def job_info(env, job: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def wait_job(env, job: str, states=DONE, timeout: float = 300.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(env, job)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job} not in {states} after {timeout}s: {job_info(env, job)}")


def submit(env, config, run_dir, *overrides, trainer=None, extra_env=None) -> str:
    """`launch submit` of a 2-node job, one CPU rank per node; returns the job id."""
    module, trainer_env = _trainer(*([trainer] if trainer else []))
    env = dict(env, MEGATRON_INFINI_TRAINER=module, **trainer_env, **(extra_env or {}))
    r = launch("submit", "--config", config, "--nodes", 2, "--gpus-per-node", 0, "--procs-per-node", 1,
               "--allow-local-run-dir", "--time", "15:00", "--rank-exit-wait", RANK_EXIT_WAIT,
               f"run_dir={run_dir}", *overrides, env=env, check=True)
    m = re.search(r"Submitted batch job (\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    return m.group(1)


def records(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps_logged(run_dir: Path) -> list:
    return [r["step"] for r in records(run_dir) if r.get("kind", "step") == "step"]  # not the "event" lines


def events(run_dir: Path, name: str) -> list:
    return [r for r in records(run_dir) if r.get("kind") == "event" and r.get("event") == name]


def job_log(run_dir: Path, job: str) -> str:
    path = run_dir / "logs" / f"slurm-{job}.out"
    return path.read_text() if path.exists() else ""


def wait_steps(env, job: str, run_dir: Path, n: int, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while len(steps_logged(run_dir)) < n:
        info = job_info(env, job)
        assert time.time() < deadline and info.get("JobState") in ("PENDING", "RUNNING"), (info, job_log(run_dir, job))
        time.sleep(0.2)


def release_requeued(env, job: str, run_dir: Path, timeout: float = 300.0) -> None:
    """Wait until the job is requeued, then let it start now: Slurm holds a requeued job back
    ~2 minutes (BeginTime); a real cluster waits, the test does not."""
    deadline = time.time() + timeout
    while True:
        info = job_info(env, job)
        if info.get("Restarts", "0") != "0" and info.get("JobState") == "PENDING":
            break
        assert time.time() < deadline and info.get("JobState") not in DONE, (info, job_log(run_dir, job))
        time.sleep(0.3)
    time.sleep(2)  # a start in the same second as the requeue meets slurmd's revoked job credential
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)


def assert_trained_to_the_end_once(run_dir: Path, steps: int, log: str) -> None:
    logged = steps_logged(run_dir)
    assert logged == list(range(1, steps + 1)), (logged, log)  # every step once, in order
    assert {e["world_size"] for e in events(run_dir, "start")} == {2}, log


def test_preemption_with_a_save_longer_than_30s_requeues_and_resumes(slurm, config, tmp_path):
    """Real preemption: a `high` job takes a node; the ranks get SIGTERM, spend 31 s in the save
    (longer than torchrun's 30 s shutdown window) inside the 90 s GraceTime, exit 75; the job is
    requeued, resumes at the preempted step and trains the debug config to the end on 2 nodes."""
    run_dir = tmp_path / "run"
    steps = 24
    job = submit(slurm, config, run_dir, f"train.steps={steps}", "checkpoint.save_interval=0",
                 "checkpoint.save_at_end=false", "train.eval_interval=0",
                 extra_env={"MEGATRON_INFINI_TEST_SAVE_DELAY": "31"})
    wait_steps(slurm, job, run_dir, 2)
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-N", "1", "-c", str(os.cpu_count() or 1),
                           "-o", str(tmp_path / "high.out"), "--wrap", "sleep 2"],
                          env=slurm, capture_output=True, text=True, check=True).stdout.strip()
    release_requeued(slurm, job, run_dir)
    info = wait_job(slurm, job)
    log = job_log(run_dir, job)
    assert job_info(slurm, high)["JobState"] == "COMPLETED"
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, log
    assert "preempted at" in log and "every rank saved a checkpoint" in log, log
    # the default --cpus-per-task: all of the node's CPUs (sinfo) shared by its one rank
    cpus = os.cpu_count() or 1
    assert f"#SBATCH --cpus-per-task={cpus}" in (run_dir / "train.sbatch").read_text()
    assert f"{cpus} CPU(s) and OMP_NUM_THREADS=1 per rank" in log  # OMP_NUM_THREADS from the environment wins
    (ckpt,) = events(run_dir, "checkpoint")
    assert ckpt["seconds"] >= 31, ckpt
    starts = events(run_dir, "start")
    assert [e["step"] for e in starts] == [0, ckpt["step"]], starts  # resumed at the preempted step
    assert 2 <= ckpt["step"] < steps, ckpt
    assert_trained_to_the_end_once(run_dir, steps, log)


def test_time_limit_usr1_checkpoints_requeues_and_resumes(slurm, config, tmp_path):
    """SIGUSR1 to the batch shell (what Slurm sends --signal-seconds before the time limit),
    forwarded to the ranks. The launcher's path, with the stand-in trainer; the real trainer's
    SIGUSR1 handling is in tests/test_checkpoint.py, its SIGTERM save in the preemption test."""
    run_dir = tmp_path / "run"
    steps = 12
    job = submit(slurm, config, run_dir, f"train.steps={steps}", "train.eval_interval=0", trainer="standin_trainer")
    wait_steps(slurm, job, run_dir, 2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    release_requeued(slurm, job, run_dir)
    info = wait_job(slurm, job)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, log
    assert "SIGUSR1" in log and "requeueing" in log and "preempted" not in log, log
    ckpt = events(run_dir, "checkpoint")[0]
    assert [e["step"] for e in events(run_dir, "start")] == [0, ckpt["step"]] and ckpt["step"] < steps
    assert_trained_to_the_end_once(run_dir, steps, log)
    assert not (run_dir / "STOP").exists()


@pytest.mark.slow
def test_two_node_job_trains_the_debug_config_to_the_end(slurm, config, tmp_path):
    """(The two tests above also train to the end on 2 nodes, with one requeue on the way.)"""
    run_dir = tmp_path / "run"
    job = submit(slurm, config, run_dir)
    info = wait_job(slurm, job, timeout=600)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED", log
    assert_trained_to_the_end_once(run_dir, read_config(str(config)).train.steps, log)
    assert "versions: " in log and "resolved config" in log and "training finished" in log
    assert "rendezvous at 127.0.0.1:" in log  # n1 does not resolve; its NodeAddr does
    assert (run_dir / "train.sbatch").exists() and (run_dir / "config.yaml").exists()


def test_scancel_saves_a_checkpoint_and_does_not_requeue(slurm, config, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, config, run_dir, "train.steps=200", trainer="standin_trainer")
    wait_steps(slurm, job, run_dir, 2)
    subprocess.run(["scancel", job], env=slurm, check=True)
    info = wait_job(slurm, job)
    log = job_log(run_dir, job)
    assert info["JobState"] == "CANCELLED" and int(info["Restarts"]) == 0, log
    (ckpt,) = events(run_dir, "checkpoint")
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == ckpt["step"]
    assert "every rank saved a checkpoint and exited 75; not requeueing" in log, log
    time.sleep(3)
    assert job_info(slurm, job)["JobState"] == "CANCELLED" and job_info(slurm, job)["Restarts"] == "0"


def test_crashing_trainer_fails_without_requeue(slurm, config, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, config, run_dir, "data.train_data=/nonexistent", trainer="standin_trainer")
    info = wait_job(slurm, job)
    log = job_log(run_dir, job)
    assert info["JobState"] == "FAILED", log
    assert int(info["Restarts"]) == 0, log
    assert "/nonexistent" in log and "not requeueing" in log, log


def _rank_pid(job: str, rank: int) -> int:
    """The pid of one rank of a job (a process whose environment has its Slurm job and rank)."""
    want = {f"SLURM_JOB_ID={job}".encode(), f"SLURM_PROCID={rank}".encode(), f"RANK={rank}".encode()}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= environ:
            return int(pid)
    raise AssertionError(f"no process of job {job} rank {rank}")


def test_dead_rank_ends_the_job_in_bounded_time_names_it_and_requeues_once(slurm, config, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, config, run_dir, "train.steps=200", trainer="standin_trainer")
    wait_steps(slurm, job, run_dir, 2)
    os.kill(_rank_pid(job, 1), 9)  # SIGKILL: no handler, no save, like an OOM kill or a lost node
    t0 = time.time()
    info = wait_job(slurm, job, states=("PENDING",) + DONE, timeout=RANK_EXIT_WAIT + 60)
    log = job_log(run_dir, job)
    assert time.time() - t0 < RANK_EXIT_WAIT + 30, log
    assert info["JobState"] == "PENDING" and int(info["Restarts"]) == 1, log  # requeued (docs/faults.md)
    assert "n2: task 1: Killed" in log and "a rank was killed by signal 9" in log, log
    assert "fault requeue 1 of MAX_FAULT_REQUEUES=1" in log and "requeueing job" in log, log
    subprocess.run(["scancel", job], env=slurm, check=True)


@pytest.mark.slow  # ~3-4 min on 2 loaded cores
def test_lost_node_requeues_resumes_and_logs_every_step_once(slurm, config, tmp_path):
    """The real trainer on 2 nodes; every rank of node n2 is killed with SIGKILL after step 6
    (checkpoints every 4 steps): the surviving rank ends within a minute, the job is requeued,
    resumes from step 4 on both nodes and trains to the end; metrics.jsonl holds every step once."""
    run_dir = tmp_path / "run"
    steps = 12
    job = submit(slurm, config, run_dir, f"train.steps={steps}", "checkpoint.save_interval=4", "train.eval_interval=0")
    wait_steps(slurm, job, run_dir, 6)
    t0 = time.time()
    os.kill(_rank_pid(job, 1), 9)
    release_requeued(slurm, job, run_dir)
    ended_s = time.time() - t0
    info = wait_job(slurm, job, timeout=600)
    log = job_log(run_dir, job)
    print(f"lost node: job requeued {ended_s:.0f} s after the kill (--rank-exit-wait {RANK_EXIT_WAIT})")
    assert ended_s < 60, log
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, log
    assert "a rank was killed by signal 9" in log and "requeueing" in log, log
    starts = [e["step"] for e in events(run_dir, "start")]
    assert starts[0] == 0 and starts[-1] in (4, 8) and len(starts) == 2, (starts, log)
    assert_trained_to_the_end_once(run_dir, steps, log)
