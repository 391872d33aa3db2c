"""Compressive Transformer / Transformer-XL op: the parallel training form against the naive
per-segment FIFO reference (outputs, final memories, gradients), streaming across calls, the
reconstruction loss reaching only the compressor, and the ValueErrors of bad settings.

Float64, so that the two forms must agree to rounding. Awkward sizes: lengths that are not a
multiple of the segment, memories shorter and longer than a segment and not a multiple of it,
odd head dims (without RoPE), grouped-query attention, a partly filled initial memory.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from megatron_infini.ops.compressive import (
    compressive_attention,
    compressive_attention_naive,
    empty_compressive_memory,
    mean_pool_compressor,
)

F64 = torch.float64


def inputs(s, b, hq, hkv, d, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, b, h, d, generator=g, dtype=F64).requires_grad_() for h in (hq, hkv, hkv))
    # a compressor away from mean pooling, so the reconstruction error is not tiny
    wk, wv = ((mean_pool_compressor(hkv, d, c, F64) + 0.2 * torch.randn(hkv, c * d, d, generator=g, dtype=F64))
              .requires_grad_() for _ in range(2))
    return q, k, v, (wk, wv)


def angles(n, d, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=F64) / d)
    return torch.arange(n, dtype=F64)[:, None] * inv.repeat(2)  # Megatron's [cat(f, f)] layout


def run(fn, q, k, v, comp, **kw):
    out, mem, aux = fn(q, k, v, comp if kw.get("compressed_memory_length") else None, **kw)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    loss = (out * weights).sum() + (0 if aux is None else 50.0 * aux)
    params = [q, k, v] + (list(comp) if kw.get("compressed_memory_length") else [])
    grads = torch.autograd.grad(loss, params)
    return out.detach(), [t.detach() for t in mem], aux, grads


CASES = [  # s, b, hq, hkv, d, N, n_m, n_cm, c, rope, partly filled initial memory
    (23, 2, 4, 2, 6, 6, 4, 3, 2, True, False),    # partial last segment, n_m < N, not a multiple of N
    (23, 2, 4, 2, 6, 6, 4, 3, 2, True, True),
    (30, 1, 3, 3, 5, 6, 12, 2, 3, False, True),   # odd head dim (no RoPE), n_m > N, c = 3
    (24, 2, 4, 1, 8, 4, 8, 2, 4, True, False),    # c = N: one compressed slot per segment; MQA
    (5, 2, 2, 2, 4, 6, 4, 3, 2, True, True),      # shorter than one segment: nothing enters memory
    (26, 2, 4, 2, 6, 8, 8, 0, 1, True, True),     # Transformer-XL (no compressed memory)
]


@pytest.mark.parametrize("s,b,hq,hkv,d,N,nm,ncm,c,rope,filled", CASES)
def test_parallel_equals_naive(s, b, hq, hkv, d, N, nm, ncm, c, rope, filled):
    q, k, v, comp = inputs(s, b, hq, hkv, d, c)
    W = nm + ncm
    memory = None
    if filled:  # the oldest slots of each FIFO still empty
        g = torch.Generator().manual_seed(3)
        valid = torch.ones(b, hkv, W, dtype=torch.float32)
        valid[..., : ncm // 2] = 0
        valid[..., ncm: ncm + c] = 0
        memory = (torch.randn(b, hkv, W, d, generator=g, dtype=F64), torch.randn(b, hkv, W, d, generator=g, dtype=F64),
                  valid)
    kw = dict(segment_length=N, memory_length=nm, compressed_memory_length=ncm, compression_rate=c,
              memory=memory, rope_freqs=angles(W + N, d) if rope else None)
    want, got = run(compressive_attention_naive, q, k, v, comp, **kw), run(compressive_attention, q, k, v, comp, **kw)
    assert_close(got[0], want[0], msg="output")
    for name, a, e in zip(("k", "v", "valid"), got[1], want[1]):
        assert_close(a, e, msg=f"final memory {name}")
    if ncm:
        assert_close(got[2], want[2], msg="reconstruction loss")
    else:
        assert got[2] is None and want[2] is None
    for name, a, e in zip(("q", "k", "v", "w_k", "w_v"), got[3], want[3]):
        assert_close(a, e, msg=f"grad {name}")
    # the memory is read: other memory contents change the first segment's output
    if filled:
        other = (memory[0] + 1.0, memory[1] - 1.0, memory[2])
        changed = compressive_attention(q, k, v, comp if ncm else None, **dict(kw, memory=other))[0]
        assert not torch.allclose(changed[: min(N, s)], got[0][: min(N, s)])


@pytest.mark.parametrize("ncm", [3, 0])
def test_streaming_equals_one_call(ncm):
    """Calls cut at segment boundaries, each starting from the memory the last one left."""
    s, N, nm, c, d = 30, 6, 4, 2, 6
    q, k, v, comp = inputs(s, 2, 4, 2, d, c, seed=1)
    kw = dict(segment_length=N, memory_length=nm, compressed_memory_length=ncm, compression_rate=c,
              rope_freqs=angles(nm + ncm + N, d))
    comp = comp if ncm else None
    whole, final, _ = compressive_attention(q, k, v, comp, **kw)
    memory, parts = None, []
    for a, e in ((0, 6), (6, 18), (18, 24), (24, 30)):
        out, memory, _ = compressive_attention(q[a:e], k[a:e], v[a:e], comp, memory=memory, **kw)
        parts.append(out)
    assert_close(torch.cat(parts), whole)
    for a, e in zip(memory, final):
        assert_close(a, e)
    # the compressed memory is in use by the end: all slots valid, reach n_m + c * n_cm tokens
    assert bool(final[2].all())
    fresh = compressive_attention(q[24:], k[24:], v[24:], comp, **kw)[0]
    assert not torch.allclose(fresh, whole[24:]), "memory had no effect"


def test_reconstruction_loss_trains_only_the_compressor():
    q, k, v, comp = inputs(24, 2, 4, 2, 6, 2, seed=2)
    kw = dict(segment_length=6, memory_length=6, compressed_memory_length=3, compression_rate=2,
              rope_freqs=angles(15, 6))
    out, _, aux = compressive_attention(q, k, v, comp, **kw)
    assert aux.item() > 0
    gq, gk, gv, gwk, gwv = torch.autograd.grad(aux, [q, k, v, *comp], allow_unused=True)
    for name, g in (("q", gq), ("k", gk), ("v", gv)):
        assert g is None or not g.abs().any(), f"reconstruction loss reached {name}"
    assert gwk.abs().sum() > 0 and gwv.abs().sum() > 0
    # and the language-model path does not reach the compressor (compressed memory is stop-gradient)
    gwk, gwv = torch.autograd.grad(out.square().sum(), list(comp), allow_unused=True)
    assert (gwk is None or not gwk.abs().any()) and (gwv is None or not gwv.abs().any())
    # gradient descent on the loss alone lowers it
    wk, wv = comp
    g = torch.autograd.grad(compressive_attention(q, k, v, comp, **kw)[2], [wk, wv])
    with torch.no_grad():
        smaller = compressive_attention(q, k, v, (wk - 0.5 * g[0], wv - 0.5 * g[1]), **kw)[2]
    assert smaller < aux


def test_mean_pool_compressor_and_empty_memory():
    x = torch.randn(2, 3, 8, 4, dtype=F64)
    from megatron_infini.ops.compressive import compress

    pooled = compress(x, mean_pool_compressor(3, 4, 2, F64), 2)
    assert_close(pooled, x.reshape(2, 3, 4, 2, 4).mean(3))
    k, v, valid = empty_compressive_memory(2, 3, 4, 5, 6, 2)
    assert k.shape == (2, 3, 8, 4) and v.shape == (2, 3, 8, 5) and not valid.any()


@pytest.mark.parametrize("kw,match", [
    (dict(memory_length=0), "memory_length"),
    (dict(compression_rate=4), "compression_rate"),          # N = 6 not a multiple of 4
    (dict(compressed_memory_length=-1), "compressed_memory_length"),
    (dict(rope_freqs=torch.zeros(5, 4)), "rope_freqs"),
])
def test_op_rejects_bad_arguments(kw, match):
    q, k, v, comp = inputs(12, 1, 2, 2, 4, 2)
    args = {**dict(segment_length=6, memory_length=4, compressed_memory_length=2, compression_rate=2), **kw}
    with pytest.raises(ValueError, match=match):
        compressive_attention(q, k, v, comp, **args)


@pytest.mark.parametrize("fields,match", [
    (dict(memory_type="kv"), "memory_type"),
    (dict(memory_type="compressive", xl_memory_length=6, compression_rate=4), "xl_memory_length.*compression_rate"),
    (dict(memory_type="compressive", segment_length=6, xl_memory_length=8, compression_rate=4), "segment_length"),
    (dict(memory_type="compressive", xl_memory_length=0), "xl_memory_length"),
    (dict(memory_type="compressive", compressed_memory_length=0), "compressed_memory_length"),
    (dict(memory_type="compressive", compression_rate=0), "compression_rate"),
    (dict(memory_type="compressive", reconstruction_loss_weight=-1.0), "reconstruction_loss_weight"),
    (dict(memory_type="xl", compressed_memory_length=4), "compressed_memory_length"),
    (dict(memory_type="xl", memory_enabled=False), "memory_enabled"),
    (dict(memory_type="xl", checkpoint_segments=1), "checkpoint_segments"),
])
def test_config_rejects_bad_settings(fields, match):
    from megatron_infini import llama_config

    base = dict(num_layers=1, hidden_size=32, num_attention_heads=2, segment_length=8)
    with pytest.raises(ValueError, match=match):
        llama_config(**{**base, **fields})


def test_config_defaults():
    from megatron_infini import llama_config

    base = dict(num_layers=1, hidden_size=32, num_attention_heads=2, segment_length=8)
    cfg = llama_config(**base, memory_type="compressive")
    assert (cfg.xl_memory_length, cfg.compressed_memory_length, cfg.compression_rate) == (8, 8, 2)
    assert llama_config(**base, memory_type="xl").compressed_memory_length == 0


def test_memory_footprint_tool_reports_the_compressive_memory(capsys):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import memory_footprint

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert memory_footprint.main([os.path.join(repo, "configs", "debug.yaml"), "model.memory_type=compressive"]) == 0
    # debug.yaml: 2 key/value heads x 16, N = 64 -> n_m = n_cm = 64 by default
    assert f"{2 * (64 + 64) * (2 * 16 + 1):,d} values per layer" in capsys.readouterr().out


# ------------------------------------------------------------- fused kernels with GQA + mask
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_sdpa_cuda_form_matches(dtype):
    """sdpa_masked's CUDA form (k/v expanded to the query heads, additive mask in the compute
    dtype: what the memory-efficient kernel takes) equals the GQA + boolean-mask call."""
    from megatron_infini.ops.sdpa import sdpa_masked

    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 4, 8, 16, generator=g).to(dtype)
    k, v = (torch.randn(6, 2, 12, 16, generator=g).to(dtype) for _ in range(2))
    allowed = torch.rand(6, 1, 8, 12, generator=g) > 0.4
    allowed[..., -1] = True  # every row attends somewhere
    ref = sdpa_masked(q, k, v, allowed, 0.3, expand_kv=False)
    got = sdpa_masked(q, k, v, allowed, 0.3, expand_kv=True)
    assert_close(got, ref, **({} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))


@pytest.mark.gpu
def test_compressive_gqa_runs_without_math_kernel():
    """On CUDA, bf16 with grouped-query heads: the op runs with SDPA's math kernel switched off."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(64, 2, 8, 64, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(64, 2, 2, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    comp = mean_pool_compressor(2, 64, 2, dtype=torch.bfloat16, device="cuda")
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out, _, _ = compressive_attention(q, k, v, (comp, comp), segment_length=16, memory_length=16,
                                          compressed_memory_length=8, compression_rate=2)
        out.float().sum().backward()
    assert torch.isfinite(q.grad).all()
