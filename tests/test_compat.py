"""megatron_infini.compat: CPU patches for megatron-core's CUDA assumptions.

The patches are undone after each test (monkeypatch snapshots what they replace), so the
rest of the session sees torch as it was.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")


@pytest.fixture
def pristine(monkeypatch):
    from megatron.core.tensor_parallel import random as mrandom

    from megatron_infini import compat

    monkeypatch.setattr(torch.cuda, "current_device", torch.cuda.current_device)
    monkeypatch.setattr(torch.cuda, "synchronize", torch.cuda.synchronize)
    monkeypatch.setattr(compat, "_APPLIED", False)
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER", None)
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False)
    return compat


def test_cpu_patches_apply_and_are_idempotent(pristine):
    from megatron.core import tensor_parallel
    from megatron.core.utils import GlobalMemoryBuffer

    assert pristine.ensure_cpu_compat() is True
    current, sync = torch.cuda.current_device, torch.cuda.synchronize
    assert pristine.ensure_cpu_compat() is True  # second call changes nothing
    assert torch.cuda.current_device is current and torch.cuda.synchronize is sync
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()  # no-op instead of "Torch not compiled with CUDA enabled"
    # What Megatron does with them: buffers on the current device, RNG fork around dropout.
    assert GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x").device.type == "cpu"
    with tensor_parallel.get_cuda_rng_tracker().fork():
        torch.nn.functional.dropout(torch.ones(4), 0.5)


def test_replaces_a_cuda_rng_tracker(pristine):
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker()  # Megatron's CUDA tracker: fork() needs CUDA
    pristine.ensure_cpu_compat()
    with mrandom.get_cuda_rng_tracker().fork():
        pass


def test_noop_when_cuda_is_available(pristine, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    current = torch.cuda.current_device
    assert pristine.ensure_cpu_compat() is False
    assert torch.cuda.current_device is current and pristine._APPLIED is False
