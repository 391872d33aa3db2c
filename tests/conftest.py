"""Test selection: `slow` tests (extra parameter combinations, beyond what CI needs to cover
every feature) run only with MEGATRON_INFINI_SLOW=1; `gpu` tests need CUDA."""

import os

import pytest
import torch
from train_utils import REPO, readme_tour, train


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
    """The debug-model training run of README.md's five-minute tour, step 1 (2 ranks, 40 steps,
    checkpoints at steps 20 and 40), shared read-only by the CLI tests; tests/test_docs.py runs
    the tour's other commands on it."""
    cmd = readme_tour()[0]  # torchrun --nproc-per-node 2 -m megatron_infini.train --config C run_dir=... k=v ...
    assert cmd[:2] == ["torchrun", "--nproc-per-node"] and cmd[3:5] == ["-m", "megatron_infini.train"], cmd
    assert cmd[5] == "--config", cmd
    overrides = [a for a in cmd[7:] if not a.startswith("run_dir=")]
    run = train(tmp_path_factory.mktemp("debug") / "run", *overrides, nproc=int(cmd[2]),
                config=os.path.join(REPO, cmd[6]))
    assert run.returncode == 0, run.output[-3000:]
    return run.run_dir
