"""The trainer with memory_type compressive and xl: real torchrun, the debug config, a few steps."""

from __future__ import annotations

import math
import os

from train_utils import train

FAST = ["train.steps=3", "train.eval_interval=3", "train.eval_iters=1", "checkpoint.save_interval=0"]


def test_compressive_trains_with_tp_sp_and_logs_the_reconstruction_loss(tmp_path):
    run = train(tmp_path / "run", *FAST, "model.memory_type=compressive", "model.xl_memory_length=64",
                "model.compressed_memory_length=32", "model.compression_rate=4",
                "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")
    assert run.returncode == 0, run.output[-3000:]
    steps = run.steps
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert math.isfinite(r["loss"]) and r["aux/reconstruction_loss"] > 0
        assert not any(k.startswith("memory/") or k.startswith("gate/") for k in r), sorted(r)
    assert math.isfinite(steps[-1]["val_loss"])
    assert os.path.isdir(os.path.join(run.run_dir, "checkpoints", "iter_0000003"))


def test_xl_trains(tmp_path):
    run = train(tmp_path / "run", *FAST, "model.memory_type=xl", "model.xl_memory_length=96", nproc=1)
    assert run.returncode == 0, run.output[-3000:]
    assert len(run.steps) == 3 and all(math.isfinite(r["loss"]) and "aux/reconstruction_loss" not in r
                                       for r in run.steps)


def test_bad_memory_settings_exit_2_naming_the_field(tmp_path):
    run = train(tmp_path / "run", "model.memory_type=compressive", "model.xl_memory_length=30",
                "model.compression_rate=4", nproc=0)
    assert run.returncode == 2, run.output[-2000:]
    assert "model.xl_memory_length" in run.output and "model.compression_rate" in run.output
    run = train(tmp_path / "run2", "model.memory_type=lstm", nproc=0)
    assert run.returncode == 2 and "model.memory_type" in run.output
