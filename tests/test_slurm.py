"""The Slurm launch path: `python -m launch submit` checks, rendering, and real jobs on a local
one-node Slurm cluster (tests/slurm_cluster.py) with 2 CPU ranks.

The trainer is `megatron_infini.train`; set MEGATRON_INFINI_TEST_TRAINER=standin (or any module
name) to run the jobs against tests/fixtures/standin_trainer.py, which follows the same contract.
While megatron_infini/train.py does not exist, the stand-in is used.
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

from launch.checks import LaunchError, check_job, check_run_dir, check_world, read_config
from launch.memory import count_parameters, estimate_memory_gb

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

DEBUG_CFG = {  # used when configs/debug.yaml does not exist yet
    "run_dir": "runs/debug",
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "segment_length": 64},
    "parallel": {"tensor_model_parallel_size": 1},
    "train": {"steps": 6, "micro_batch_size": 2, "global_batch_size": 4, "seq_length": 128},
    "logging": {"wandb_mode": "disabled"},
}


def _trainer() -> tuple:
    """(module, extra env) of the trainer the jobs run."""
    name = os.environ.get("MEGATRON_INFINI_TEST_TRAINER", "")
    if not name and importlib.util.find_spec("megatron_infini.train") is not None:
        name = "megatron_infini.train"
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
               f"run_dir={tmp_path}/run", "train.steps=7", "train.global_batch_size=64", "data.train_data=/data/a b",
               check=True)
    s = r.stdout
    assert "{{" not in s and "}}" not in s
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=2:00:00",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@", f"#SBATCH --output={tmp_path}/run/logs/slurm-%j.out",
                 f"RUN_DIR={tmp_path}/run", "NPROC_PER_NODE=8", "--rdzv-backend c10d", "export PYTHONUNBUFFERED=1"):
        assert line in s, line
    assert "OVERRIDES=(" in s and "'data.train_data=/data/a b'" in s and "train.steps=7" in s
    assert "CUDA_VISIBLE_DEVICES=" not in s
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    script = tmp_path / "x.sbatch"
    script.write_text(s)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    cpu = launch("submit", "--config", config, "--gpus-per-node", 0, "--dry-run", f"run_dir={tmp_path}/run",
                 check=True).stdout
    assert "NPROC_PER_NODE=2" in cpu and "export CUDA_VISIBLE_DEVICES=" in cpu and "#SBATCH --gpus-per-node" not in cpu


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


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from slurm_cluster import slurm_binaries_missing, slurm_cluster

    missing = slurm_binaries_missing()
    if missing:
        pytest.skip(f"Slurm binaries missing ({', '.join(missing)}): run `bash tools/install_slurm.sh`")
    if os.geteuid() != 0:
        pytest.skip("the local test cluster runs slurmd as root (SlurmUser=root)")
    module, extra = _trainer()
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as env:
        env = dict(env, MEGATRON_INFINI_TRAINER=module, WANDB_MODE="disabled", **extra)
        print(f"slurm tests run trainer module {module}")
        yield env


def job_info(env, job: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(env, job: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
             timeout: float = 240.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(env, job)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job} not in {states} after {timeout}s: {job_info(env, job)}")


def submit(env, config, run_dir, *overrides) -> str:
    r = launch("submit", "--config", config, "--gpus-per-node", 0, "--time", "10:00", f"run_dir={run_dir}",
               *overrides, env=env, check=True)
    m = re.search(r"Submitted batch job (\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    return m.group(1)


def steps_logged(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if r.get("kind", "step") == "step"]  # not the "event" lines


def job_log(run_dir: Path, job: str) -> str:
    path = run_dir / "logs" / f"slurm-{job}.out"
    return path.read_text() if path.exists() else ""


def test_job_runs_to_completion(slurm, config, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, config, run_dir, "train.steps=4")
    info = wait_job(slurm, job)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED", log
    assert sorted(steps_logged(run_dir)) == [1, 2, 3, 4] or sorted(steps_logged(run_dir)) == [0, 1, 2, 3], log
    assert "versions: " in log and "resolved config" in log and "training finished" in log
    assert (run_dir / "train.sbatch").exists() and (run_dir / "config.yaml").exists()


def test_preemption_checkpoints_requeues_and_resumes(slurm, config, tmp_path):
    run_dir = tmp_path / "run"
    # enough steps that the stop lands mid-run (the stand-in sleeps 0.5 s a step, the debug model ~0.2 s)
    default = 12 if _trainer()[0] == "standin_trainer" else 30
    steps = int(os.environ.get("MEGATRON_INFINI_TEST_PREEMPT_STEPS", default))
    job = submit(slurm, config, run_dir, f"train.steps={steps}")
    deadline = time.time() + 180
    while len(steps_logged(run_dir)) < 2:
        assert time.time() < deadline and job_info(slurm, job).get("JobState") in ("PENDING", "RUNNING"), \
            job_log(run_dir, job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    # Slurm holds a requeued job back ~2 minutes (BeginTime); a real cluster waits, the test does not
    while True:
        info = job_info(slurm, job)
        if info.get("Restarts", "0") != "0" and info.get("JobState") == "PENDING":
            break
        assert time.time() < deadline and info.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED"), \
            (info, job_log(run_dir, job))
        time.sleep(0.2)
    time.sleep(2)  # a start in the same second as the requeue meets slurmd's revoked job credential
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    info = wait_job(slurm, job)
    log = job_log(run_dir, job)
    logged = steps_logged(run_dir)
    assert info["JobState"] == "COMPLETED", log
    assert int(info["Restarts"]) == 1, log
    assert "requeueing" in log, log
    assert len(logged) == steps and sorted(logged) == logged and len(set(logged)) == steps, (logged, log)
    assert not (run_dir / "STOP").exists()


def test_crashing_trainer_fails_without_requeue(slurm, config, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, config, run_dir, "data.train_data=/nonexistent")
    info = wait_job(slurm, job)
    log = job_log(run_dir, job)
    assert info["JobState"] == "FAILED", log
    assert int(info["Restarts"]) == 0, log
    assert "/nonexistent" in log and "not requeueing" in log, log
