"""Faults real clusters have (docs/faults.md), each injected into the real trainer: detected,
reported, and recovered from with nothing lost.

Hooks: MEGATRON_INFINI_FAULT (megatron_infini/training/faults.py, checkpointing/manager.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from train_utils import DEBUG_CONFIG, REPO, read_metrics, train

FAST = ["train.eval_interval=0", "train.steps=6"]


def _tensors(ckpt_dir: str, tmp_path) -> dict:
    """Every tensor of a checkpoint's model/ directory (weights and optimizer state), one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{os.path.basename(ckpt_dir)}.pt"
    dcp_to_torch_save(os.path.join(ckpt_dir, "model"), str(out))
    return {k: v for k, v in torch.load(out).items() if isinstance(v, torch.Tensor)}


def _events(run_dir, name):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh if line.strip()]
    return [r for r in recs if r.get("kind") == "event" and r["event"] == name]


@pytest.mark.parametrize("zero, precision", [(0, "fp32"), pytest.param(1, "bf16", marks=pytest.mark.slow),
                                             pytest.param(2, "fp32", marks=pytest.mark.slow),
                                             pytest.param(3, "fp32", marks=pytest.mark.slow)])
def test_nonfinite_steps_are_skipped_on_every_rank_and_never_saved(tmp_path, zero, precision):
    """NaN loss on rank 1 only at step 3: both ranks skip it (weights, Adam moments and Adam's
    step count equal those after step 2); NaN at steps 5-6 on every rank with
    max_consecutive_skips=2 stops the run with exit code 3 at step 6, unsaved (step 5's checkpoint
holds step 4's weights).
    ZeRO 0, where DeepSpeed itself checks nothing: the guard is the only defence (slow: ZeRO 1
    with bf16, DeepSpeed's BF16 optimizer with fp32 master weights; ZeRO 2 and 3)."""
    run_dir = str(tmp_path / "run")
    run = train(run_dir, *FAST, f"deepspeed.zero_stage={zero}", f"deepspeed.precision={precision}", "checkpoint.save_interval=1", "checkpoint.keep_last=0",
                "train.max_consecutive_skips=2", env={"MEGATRON_INFINI_FAULT": "nan_loss@3:1,nan_loss@5-6"})
    assert run.returncode != 0, run.output[-3000:]
    assert "2 steps in a row (up to step 6) had a non-finite loss" in run.output, run.output[-3000:]
    assert "exitcode  : 3" in run.output or "exit code 3" in run.output or "exitcode: 3" in run.output.replace(" ", ""), \
        run.output[-3000:]
    steps = read_metrics(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped_steps"] for r in steps] == [0, 0, 1, 1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps if r["step"] in (1, 2, 4))
    assert _events(run_dir, "nonfinite_stop")[0]["step"] == 6
    ckpts = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert [c for c in ckpts if c.startswith("iter_")] == [f"iter_{s:07d}" for s in range(1, 6)]
    ck = lambda s: os.path.join(run_dir, "checkpoints", f"iter_{s:07d}")  # noqa: E731
    after2, after3, after4, after5 = (_tensors(ck(s), tmp_path) for s in (2, 3, 4, 5))
    assert any(k.startswith("optimizer.exp_avg.") for k in after3)
    assert after3.keys() == after2.keys()
    assert [k for k in after2 if not torch.equal(after2[k], after3[k])] == []  # the skipped step changed nothing
    assert any(not torch.equal(after3[k], after4[k]) for k in after3)  # step 4 trained
    assert [k for k in after4 if not torch.equal(after4[k], after5[k])] == []
    assert all(torch.isfinite(v).all() for v in after5.values() if v.is_floating_point())
    meta = lambda s: json.load(open(os.path.join(ck(s), "meta.json")))["optimizer"]["step"]  # noqa: E731
    assert (meta(2), meta(3), meta(4)) == (2, 2, 3)  # Adam's step count does not advance on a skip


def test_non_finite_weights_are_refused_before_a_save(tmp_path):
    """(The all-reduce that makes every rank agree is the guard's, shown on 2 ranks above.)"""
    import torch.distributed as dist

    from megatron_infini.training.faults import check_finite_weights

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = torch.nn.Linear(3, 2)
        check_finite_weights(model, 7)  # finite: no error
        with torch.no_grad():
            model.weight[0, 0] = float("inf")
        with pytest.raises(FloatingPointError, match="non-finite weights at step 7: not saving"):
            check_finite_weights(model, 7)
        # ZeRO-3 layout: the parameter is an empty placeholder, this rank's partition is `ds_tensor`
        part = torch.nn.Linear(3, 2)
        with torch.no_grad():
            part.weight.ds_tensor = torch.tensor([0.5, float("nan")])
            part.weight.data = torch.empty(0)
        with pytest.raises(FloatingPointError, match="non-finite weights at step 7"):
            check_finite_weights(part, 7)
    finally:
        dist.destroy_process_group()


def _start(run_dir, *overrides, env=None) -> subprocess.Popen:
    """`python -m megatron_infini train` (one rank) in the background, output to run_dir/../log."""
    cmd = [sys.executable, "-m", "megatron_infini", "train", "--config", DEBUG_CONFIG, f"run_dir={run_dir}",
           "logging.progress_bar=false", *overrides]
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    full_env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore", **(env or {}))
    log = open(f"{run_dir}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_signal_before_the_first_step_exits_75_at_once_without_writing(tmp_path):
    """SIGUSR1 while importing, SIGTERM while loading a checkpoint (a slow load): exit 75 within
    seconds, the previous checkpoint stays the latest, nothing new under checkpoints/."""
    run_dir = str(tmp_path / "run")
    assert train(run_dir, "train.steps=2", "train.eval_interval=0", nproc=0).returncode == 0
    ckpts = os.path.join(run_dir, "checkpoints")
    before = sorted(os.listdir(ckpts))
    metrics = open(os.path.join(run_dir, "metrics.jsonl")).read()

    proc = _start(run_dir, "train.steps=4")
    time.sleep(0.5)  # the interpreter is importing torch and megatron
    proc.send_signal(signal.SIGUSR1)
    t0 = time.time()
    assert proc.wait(timeout=60) == 75
    importing_s = time.time() - t0

    beat = os.path.join(run_dir, "heartbeat", "rank0")
    os.remove(beat)
    proc = _start(run_dir, "train.steps=4", env={"MEGATRON_INFINI_FAULT": "load_delay@60"})
    _wait_for(lambda: os.path.exists(beat), 120, "the trainer to start")  # written just before the load
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    assert proc.wait(timeout=30) == 75
    loading_s = time.time() - t0
    log = open(f"{run_dir}.log").read()
    assert "SIGTERM while loading a checkpoint (before the first step): exiting 75 without a checkpoint" in log, log
    print(f"signal to exit: {importing_s:.2f} s while importing, {loading_s:.2f} s while loading a checkpoint")
    assert importing_s < 5 and loading_s < 5, (importing_s, loading_s)
    assert sorted(os.listdir(ckpts)) == before  # no new, partial or temporary checkpoint
    assert open(os.path.join(run_dir, "metrics.jsonl")).read() == metrics
    assert "loading a checkpoint" in open(os.path.join(run_dir, "REQUEUE")).read()


def _steps_once(run_dir, steps: int) -> None:
    """Every step 1..steps logged exactly once in metrics.jsonl (de-duplicated on resume)."""
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, steps + 1))


@pytest.mark.slow  # ~100 s on 2 cores; the watchdog alone is tested below in seconds
@pytest.mark.parametrize("timeout_s", [30])
def test_frozen_rank_is_detected_reported_and_the_rerun_resumes(tmp_path, timeout_s):
    """Rank 1 freezes (SIGSTOP) after step 3 of 8 on 2 ranks: rank 0's watchdog dumps its stacks,
    names rank 1 and exits 4 within train.hang_timeout_s plus a few seconds; torchrun then
    ends the job (the frozen rank gets SIGKILL after torchrun's 30 s shutdown wait). A rerun
    resumes from the step-2 checkpoint and trains to the end, every step logged once."""
    run_dir = str(tmp_path / "run")
    args = ["train.steps=8", "train.eval_interval=0", "checkpoint.save_interval=2", f"train.hang_timeout_s={timeout_s}"]
    run = train(run_dir, *args, env={"MEGATRON_INFINI_FAULT": "sigstop@3:1"}, timeout=300)
    ended = time.time()
    frozen_at = json.load(open(os.path.join(run_dir, "heartbeat", "rank1")))["time"]  # its last heartbeat
    out = run.output
    assert run.returncode != 0, out[-3000:]
    assert "rank 1 stops itself (SIGSTOP) after step 3" in out
    assert f"[watchdog] rank 0: no step completed for" in out and "Python stacks of all threads" in out, out[-3000:]
    assert 'File "' in out.split("Python stacks of all threads")[1]  # faulthandler's stack lines
    assert "ranks that stopped reporting (frozen or dead): rank 1 on" in out, out[-3000:]
    assert "hang at step 4" in out and "exitcode  : 4" in out, out[-3000:]
    assert "step 4: ranks that stopped reporting (frozen or dead): rank 1" in open(os.path.join(run_dir, "HANG")).read()
    assert "step 4 never completed; ranks at step 3: all" in out
    import re

    waited = float(re.search(r"\[watchdog\] rank 0: no step completed for (\d+) s", out).group(1))
    assert timeout_s <= waited < timeout_s + 15
    print(f"frozen rank: rank 0's watchdog fired {waited:.0f} s after the last step (hang_timeout_s={timeout_s}); "
          f"the torchrun job ended {ended - frozen_at:.0f} s after the rank froze")
    assert ended - frozen_at < 90  # detection + torchrun's 30 s before it SIGKILLs the frozen rank

    rerun = train(run_dir, *args, timeout=300)
    assert rerun.returncode == 0, rerun.output[-3000:]
    assert [e["step"] for e in _events(run_dir, "start")] == [0, 2]
    _steps_once(run_dir, 8)


WATCHDOG_SCRIPT = """
import json, os, sys, time
from megatron_infini.training.watchdog import HangWatchdog
run_dir = sys.argv[1]
os.makedirs(os.path.join(run_dir, "heartbeat"), exist_ok=True)
with open(os.path.join(run_dir, "heartbeat", "rank1"), "w") as fh:  # a rank frozen 60 s ago at step 6
    json.dump({"step": 6, "time": time.time() - 60, "host": "node7", "pid": 4242}, fh)
dog = HangWatchdog(run_dir, rank=0, world_size=2, timeout_s=1.0, first_timeout_s=1.0, step=5, interval_s=0.2).start()
dog.beat(6)
dog.beat(7)
def stuck_in_a_collective():
    time.sleep(30)
stuck_in_a_collective()
print("not reached")
"""


def test_watchdog_dumps_stacks_names_the_frozen_rank_and_exits_4(tmp_path):
    """The watchdog alone, in one process (the 2-rank torchrun run above is slow)."""
    run_dir = str(tmp_path / "run")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", WATCHDOG_SCRIPT, run_dir], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    elapsed = time.time() - t0
    assert proc.returncode == 4, proc.stderr
    assert "not reached" not in proc.stdout and elapsed < 20
    err = proc.stderr
    assert "[watchdog] rank 0: no step completed for 1 s (limit 1 s" in err and "last completed step 7" in err, err
    assert "in stuck_in_a_collective" in err  # the stack of the main thread, from faulthandler
    assert ("hang at step 8: ranks that stopped reporting (frozen or dead): rank 1 on node7 pid 4242 "
            "(last heartbeat 6") in err, err
    assert "step 7 never completed; ranks at step 6: [1]" in err, err
    beat = json.load(open(os.path.join(run_dir, "heartbeat", "rank0")))
    assert beat["step"] == 7
    assert open(os.path.join(run_dir, "HANG")).read().startswith("step 8: ranks that stopped reporting")


def test_full_disk_during_a_save_keeps_the_previous_checkpoint_latest(tmp_path):
    """ENOSPC in the middle of the step-4 save (after the step-2 one): the run fails naming the
    error and the checkpoint that stays the latest; the half-written directory is not
    published; a rerun resumes from step 2 and logs every step once."""
    from megatron_infini.checkpointing import manager, manifest

    run_dir = str(tmp_path / "run")
    args = ["train.steps=4", "train.eval_interval=0", "checkpoint.save_interval=2"]
    run = train(run_dir, *args, nproc=0, env={"MEGATRON_INFINI_FAULT": "save_enospc@4"})
    assert run.returncode == 1, run.output[-3000:]
    root = os.path.join(run_dir, "checkpoints")
    assert (f"checkpoint save at step 4 failed ([Errno 28] No space left on device: '{root}/iter_0000004.tmp'); "
            f"nothing was published: the latest checkpoint is still {root}/iter_0000002") in run.output, run.output[-3000:]
    assert manager.complete_checkpoints(root) == [2] and manager.read_tracker(root) == 2
    assert manager.resolve_checkpoint(run_dir) == os.path.join(root, "iter_0000002")
    manifest.verify(os.path.join(root, "iter_0000002"))
    assert os.path.isdir(os.path.join(root, "iter_0000004.tmp"))  # never looked at by resume

    rerun = train(run_dir, *args, nproc=0)
    assert rerun.returncode == 0, rerun.output[-3000:]
    assert [e["step"] for e in _events(run_dir, "start")] == [0, 2]
    assert manager.complete_checkpoints(root) == [4, 2] and not os.path.exists(os.path.join(root, "iter_0000004.tmp"))
    _steps_once(run_dir, 4)


def _cut_copy(tmp_path, suffix: str) -> str:
    """A copy of the shipped training data with PREFIX.suffix cut to half its size."""
    import shutil

    from megatron_infini.data import SHAKESPEARE_TRAIN_PREFIX

    prefix = str(tmp_path / suffix / "train")
    os.makedirs(os.path.dirname(prefix))
    for ext in (".bin", ".idx", ".json"):
        shutil.copyfile(str(SHAKESPEARE_TRAIN_PREFIX) + ext, prefix + ext)
    os.truncate(prefix + suffix, os.path.getsize(prefix + suffix) // 2)
    return prefix


def test_truncated_data_files_are_named_before_any_work(tmp_path):
    """A cut .bin (in-process) and a cut .idx (the trainer: exit 2, one line, no traceback).
    Missing data and data made with another tokenizer: tests/test_train.py."""
    from megatron_infini.data.dataset import PackedDocumentDataset

    prefix = _cut_copy(tmp_path, ".bin")
    with pytest.raises(ValueError, match=rf"{prefix}.bin has \d+ bytes but {prefix}.idx describes \d+: the .bin is truncated"):
        PackedDocumentDataset(prefix, seq_length=256)
    prefix = _cut_copy(tmp_path, ".idx")
    run = train(tmp_path / "run", f"data.train_data={prefix}", "data.valid_data=", nproc=0, timeout=120)
    assert run.returncode == 2, run.output[-3000:]
    assert f"error: {prefix}.idx is truncated: " in run.output and "Traceback" not in run.output, run.output[-3000:]
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


FAKE_SLURM = {  # the Slurm commands the batch script calls, as shell stand-ins
    "srun": '#!/bin/sh\necho "step $HANG_STEP: rank 1 stopped reporting" > "$RUN_DIR_FOR_TEST/HANG"\nexit 4\n',
    "scontrol": ('#!/bin/sh\ncase "$1 $2" in\n"show hostnames") echo n1;;\n"show node") echo "NodeAddr=127.0.0.1";;\n'
                 '"show job") echo "JobState=RUNNING PreemptTime=None";;\nrequeue*) echo requeue >> "$RUN_DIR_FOR_TEST/calls";;\n'
                 'esac\n'),
}


def test_batch_script_requeues_a_hang_once_per_step_reached(tmp_path):
    """slurm/train.sbatch with stand-ins for srun (a rank hangs: RUN_DIR/HANG, exit 4) and
    scontrol: requeued the first time, not when it hangs again at the same step
    (MAX_FAULT_REQUEUES=1), requeued again for a hang at a later step (progress was made)."""
    run_dir = tmp_path / "run"
    script = subprocess.run([sys.executable, "-m", "launch", "submit", "--config", DEBUG_CONFIG, "--gpus-per-node", "0",
                             "--cpus-per-task", "1", "--dry-run", f"run_dir={run_dir}"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=True).stdout
    (tmp_path / "job.sh").write_text(script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir.mkdir()

    def job(step: int) -> subprocess.CompletedProcess:
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="7",
                   SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="n1", RUN_DIR_FOR_TEST=str(run_dir),
                   HANG_STEP=str(step), RDZV_PORT="29999")
        return subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=120)

    calls = lambda: (run_dir / "calls").read_text().split() if (run_dir / "calls").exists() else []  # noqa: E731
    first = job(5)
    assert first.returncode == 0 and calls() == ["requeue"], first.stdout + first.stderr
    assert "hang (exit 4): step 5: rank 1 stopped reporting; fault requeue 1 of MAX_FAULT_REQUEUES=1" in first.stdout
    assert (run_dir / "FAULT_REQUEUES").read_text().split() == ["1", "5"]
    again = job(5)
    assert again.returncode == 4 and calls() == ["requeue"], again.stdout + again.stderr
    assert "rank 1 stopped reporting: again at step 5 after 1 requeue(s) without progress" in again.stdout
    later = job(9)
    assert later.returncode == 0 and calls() == ["requeue", "requeue"], later.stdout + later.stderr
