"""Test selection: `slow` tests (extra parameter combinations, beyond what CI needs to cover
every feature) run only with MEGATRON_INFINI_SLOW=1; `gpu` tests need CUDA."""

import os

import pytest
import torch
from train_utils import train


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("MEGATRON_INFINI_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow: set MEGATRON_INFINI_SLOW=1 to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory):
    """A 2-step debug-model training run with checkpoints, shared (read-only) by the CLI tests."""
    run = train(tmp_path_factory.mktemp("debug") / "run", "train.steps=2", "train.eval_interval=0",
                "deepspeed.zero_stage=0", nproc=0)
    assert run.returncode == 0, run.output[-3000:]
    return run.run_dir
