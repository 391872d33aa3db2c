"""The memory math runs in full float32 whatever torch's global float32 matmul settings.

NGC images start torch with TF32 matmuls (`TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1`), and
`torch.set_float32_matmul_precision("medium")` makes oneDNN run float32 matmuls in bf16 on CPUs
that have it. Reference: the op under the default "highest". Under "medium" the memory state
(M, z) and the naive op (all its matmuls are memory matmuls) must be bitwise equal, and the
settings must be back as they were after the call. Where the CPU ignores "medium" (no bf16
matmuls) the comparison cannot fail and the test skips.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from megatron_infini.ops import _common, infini_attention, infini_attention_naive

S, B, HQ, HKV, D, N = 40, 2, 4, 2, 32, 16


@contextlib.contextmanager
def matmul_precision(value: str):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(S, B, h, D, generator=g, requires_grad=True) for h in (HQ, HKV))
    v = torch.randn(S, B, HKV, D, generator=g, requires_grad=True)
    return q, k, v, torch.linspace(-1.0, 1.0, HQ)


def _run(update: str):
    """The fast op's output, memory and the gradients of q and k through the memory path (the
    local attention reads detached copies: its backward is not memory math), and the naive op's
    output (all its matmuls are float32 math)."""
    q, k, v, gate = _inputs()
    out, (M, z) = infini_attention(q, k, v, gate, segment_length=N, update=update,
                                   q_local=q.detach(), k_local=k.detach())
    (M.square().sum() + z.sum() + out.square().sum()).backward()
    naive, _ = infini_attention_naive(q.detach(), k.detach(), v.detach(), gate, segment_length=N, update=update)
    return out.detach(), M.detach(), z.detach(), q.grad, k.grad, naive


def _medium_changes_cpu_matmuls() -> bool:
    a, b = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)).split(128)
    full = a @ b.T
    with matmul_precision("medium"):
        return not torch.equal(a @ b.T, full)


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_memory_math_ignores_global_matmul_precision(update, monkeypatch):
    if not _medium_changes_cpu_matmuls():
        pytest.skip("this CPU runs float32 matmuls in float32 under 'medium': nothing to compare")
    ref = _run(update)
    with matmul_precision("medium"):
        settings = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        got = _run(update)
        assert torch.get_float32_matmul_precision() == "medium"  # restored after the op
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == settings
        monkeypatch.setattr(_common, "ieee_fp32_matmuls", contextlib.nullcontext)  # the check can fail:
        lowered = _run(update)
    for name, a, b in zip(("out", "M", "z", "dq", "dk", "naive"), got, ref):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, b) for a, b in zip(lowered, ref))


def test_settings_restored_after_mixed_apis():
    """Settings made with the per-backend API only (no legacy value to read) come back too."""
    mkldnn = torch.backends.mkldnn.matmul
    old = mkldnn.fp32_precision
    try:
        mkldnn.fp32_precision = "bf16"
        with _common.ieee_fp32_matmuls():
            assert mkldnn.fp32_precision == "ieee"
            assert torch.get_float32_matmul_precision() == "highest"
        assert mkldnn.fp32_precision == "bf16"
    finally:
        mkldnn.fp32_precision = old
