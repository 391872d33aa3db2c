"""The fast op against the paper's segment loop, and the op's invariants."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_infini.ops import EPS, fast, infini_attention, infini_attention_naive

# (s, b, hq, hkv, dk, dv, segment_length): lengths not divisible by the segment, dk != dv,
# odd head dims, grouped-query attention, batch > 1, a single short segment.
SHAPES = [
    (37, 2, 6, 2, 5, 7, 8),
    (64, 1, 4, 4, 8, 8, 16),
    (50, 3, 4, 1, 9, 3, 7),
    (5, 2, 2, 1, 3, 3, 8),
    (33, 1, 3, 3, 4, 6, 1),
]
UPDATES = ["linear", "delta"]


def _inputs(s, b, hq, hkv, dk, dv, dtype=torch.float32, seed=0, scale=1.0, with_memory=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()

    q, k, v = r(s, b, hq, dk), r(s, b, hkv, dk), r(s, b, hkv, dv)
    gate = torch.randn(hq, generator=g).to(dtype).requires_grad_()
    memory = None
    if with_memory:  # a plausible state: a sum of sigma(K)^T V over some earlier tokens
        sk = F.elu(torch.randn(10, b, hkv, dk, generator=g)) + 1
        vv = torch.randn(10, b, hkv, dv, generator=g)
        M = torch.einsum("tbhi,tbhj->bhij", sk, vv).requires_grad_()
        z = sk.sum(0).requires_grad_()
        memory = (M, z)
    return q, k, v, gate, memory


def _grads(out, mem, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g)
    w_M, w_z = torch.randn(mem[0].shape, generator=g), torch.randn(mem[1].shape, generator=g)
    loss = (out.float() * w_out).sum() + (mem[0] * w_M).sum() * 1e-2 + (mem[1] * w_z).sum() * 1e-2
    return torch.autograd.grad(loss, leaves, allow_unused=False)


def _close(a, b, rtol, atol, what):
    err = (a.float() - b.float()).abs().max().item()
    ref = b.float().abs().max().item()
    assert err <= atol + rtol * ref, f"{what}: max abs err {err:.3e} (ref max {ref:.3e})"


@pytest.fixture(params=["chunked", "per-segment"])
def chunking(request, monkeypatch):
    """The fast op's memory path loops over chunks of whole segments sized to a budget of
    elements (CHUNK_ELEMENTS); test shapes are tiny, so by default one chunk holds every
    segment: also run with a budget of one element, i.e. one segment per chunk."""
    if request.param == "per-segment":
        monkeypatch.setitem(fast.CHUNK_ELEMENTS, "cpu", 1)
    return request.param


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fast_matches_naive_fp32(shape, update, chunking):
    s, b, hq, hkv, dk, dv, N = shape
    q, k, v, gate, memory = _inputs(s, b, hq, hkv, dk, dv)
    leaves = [q, k, v, gate, *memory]
    kw = dict(segment_length=N, update=update, memory=memory)
    out_f, mem_f = infini_attention(q, k, v, gate, **kw)
    out_n, mem_n = infini_attention_naive(q, k, v, gate, **kw)
    assert out_f.shape == (s, b, hq, dv) and out_f.dtype == q.dtype
    assert mem_f[0].dtype == torch.float32 and mem_f[0].shape == (b, hkv, dk, dv)
    _close(out_f, out_n, 1e-5, 1e-5, "out")
    _close(mem_f[0], mem_n[0], 1e-5, 1e-5, "M")
    _close(mem_f[1], mem_n[1], 1e-5, 1e-5, "z")
    for name, gf, gn in zip("q k v gate M z".split(), _grads(out_f, mem_f, leaves), _grads(out_n, mem_n, leaves)):
        _close(gf, gn, 1e-4, 1e-5, f"grad {name}")


@pytest.mark.parametrize("update", UPDATES)
def test_fast_matches_naive_with_local_qk(update):
    """q_local / k_local feed the local attention only; the memory reads q / k."""
    s, b, hq, hkv, dk, dv, N = 40, 2, 4, 2, 6, 6, 12
    q, k, v, gate, memory = _inputs(s, b, hq, hkv, dk, dv)
    ql = torch.randn(s, b, hq, dk, requires_grad=True)
    kl = torch.randn(s, b, hkv, dk, requires_grad=True)
    kw = dict(segment_length=N, update=update, memory=memory, q_local=ql, k_local=kl, softmax_scale=0.3)
    out_f, mem_f = infini_attention(q, k, v, gate, **kw)
    out_n, mem_n = infini_attention_naive(q, k, v, gate, **kw)
    _close(out_f, out_n, 1e-5, 1e-5, "out")
    leaves = [q, k, v, gate, ql, kl]
    for name, gf, gn in zip("q k v gate q_local k_local".split(), _grads(out_f, mem_f, leaves), _grads(out_n, mem_n, leaves)):
        _close(gf, gn, 1e-4, 1e-5, f"grad {name}")
    # and the local q/k really are used: changing them changes the output
    out_plain, _ = infini_attention(q, k, v, gate, segment_length=N, update=update, memory=memory)
    assert (out_plain - out_f).abs().max() > 1e-3


@pytest.mark.parametrize("update", UPDATES)
def test_fast_matches_naive_bf16(update):
    s, b, hq, hkv, dk, dv, N = 96, 2, 4, 2, 16, 16, 32
    q, k, v, gate, memory = _inputs(s, b, hq, hkv, dk, dv, dtype=torch.bfloat16)
    kw = dict(segment_length=N, update=update, memory=memory)
    out_f, mem_f = infini_attention(q, k, v, gate, **kw)
    out_n, mem_n = infini_attention_naive(q, k, v, gate, **kw)
    assert out_f.dtype == torch.bfloat16 and mem_f[0].dtype == torch.float32
    _close(out_f, out_n, 2e-2, 2e-2, "out bf16")
    _close(mem_f[0], mem_n[0], 1e-4, 1e-4, "M bf16")  # memory arithmetic is float32 in both
    leaves = [q, k, v, gate]
    for name, gf, gn in zip("q k v gate".split(), _grads(out_f, mem_f, leaves), _grads(out_n, mem_n, leaves)):
        _close(gf, gn, 5e-2, 5e-2, f"grad {name} bf16")


@pytest.mark.parametrize("impl", [infini_attention, infini_attention_naive], ids=["fast", "naive"])
@pytest.mark.parametrize("update", UPDATES)
def test_streaming_in_chunks_equals_one_call(impl, update):
    s, b, hq, hkv, dk, dv, N = 70, 2, 4, 2, 8, 5, 10
    q, k, v, gate, _ = _inputs(s, b, hq, hkv, dk, dv, with_memory=False)
    whole, mem_whole = impl(q, k, v, gate, segment_length=N, update=update)
    mem, outs = None, []
    for start, stop in [(0, 20), (20, 50), (50, 70)]:  # cuts at segment boundaries
        out, mem = impl(q[start:stop], k[start:stop], v[start:stop], gate, segment_length=N, update=update, memory=mem)
        outs.append(out)
    _close(torch.cat(outs), whole, 1e-5, 1e-6, "chunked out")
    _close(mem[0], mem_whole[0], 1e-5, 1e-5, "chunked M")
    _close(mem[1], mem_whole[1], 1e-5, 1e-5, "chunked z")


@pytest.mark.parametrize("update", UPDATES)
def test_gradient_reaches_first_segment_through_memory(update):
    """No detach between segments: a loss on the last segment moves k and v of the first."""
    s, b, hq, hkv, dk, dv, N = 64, 1, 2, 1, 8, 8, 16
    q, k, v, gate, _ = _inputs(s, b, hq, hkv, dk, dv, with_memory=False)
    out, _ = infini_attention(q, k, v, gate, segment_length=N, update=update)
    gk, gv = torch.autograd.grad(out[-N:].square().sum(), [k, v])
    assert gk[:N].abs().sum() > 1e-3 and gv[:N].abs().sum() > 1e-3
    # and only through the memory: with the gate closed (sigmoid -> 0) nothing reaches them
    closed = torch.full_like(gate, -30.0)
    out, _ = infini_attention(q, k, v, closed, segment_length=N, update=update)
    gk, gv = torch.autograd.grad(out[-N:].square().sum(), [k, v])
    assert gk[:N].abs().max() < 1e-8 and gv[:N].abs().max() < 1e-8


@pytest.mark.parametrize("update", UPDATES)
def test_single_segment_is_gated_causal_attention(update):
    """Empty memory retrieves exactly 0, so one segment is (1 - sigmoid(beta)) * causal attention."""
    s, b, hq, hkv, dk, dv = 24, 2, 4, 2, 8, 8
    q, k, v, gate, _ = _inputs(s, b, hq, hkv, dk, dv, with_memory=False)
    out, (M, z) = infini_attention(q, k, v, gate, segment_length=s, update=update)
    ref = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3).repeat_interleave(2, 1),
        v.permute(1, 2, 0, 3).repeat_interleave(2, 1), is_causal=True,
    ).permute(2, 0, 1, 3)
    _close(out, (1 - torch.sigmoid(gate)).view(1, 1, hq, 1) * ref, 1e-5, 1e-6, "single segment")
    sk = F.elu(k) + 1
    _close(z, sk.sum(0), 1e-5, 1e-5, "z is the sum of sigma(K)")
    if update == "linear":
        _close(M, torch.einsum("tbhi,tbhj->bhij", sk, v), 1e-5, 1e-5, "M is sigma(K)^T V")


@pytest.mark.parametrize("update", UPDATES)
def test_activation_checkpointing_is_exact(update):
    s, b, hq, hkv, dk, dv, N = 45, 2, 4, 2, 8, 8, 6
    q, k, v, gate, memory = _inputs(s, b, hq, hkv, dk, dv)
    leaves = [q, k, v, gate, *memory]
    ref = infini_attention(q, k, v, gate, segment_length=N, update=update, memory=memory)
    ref_grads = _grads(ref[0], ref[1], leaves)
    for blocks in (1, 3):
        got = infini_attention(q, k, v, gate, segment_length=N, update=update, memory=memory, checkpoint_segments=blocks)
        _close(got[0], ref[0], 1e-6, 1e-6, "checkpointed out")
        for name, gc, gr in zip("q k v gate M z".split(), _grads(got[0], got[1], leaves), ref_grads):
            _close(gc, gr, 1e-5, 1e-6, f"checkpointed grad {name}")


@pytest.mark.parametrize("update", UPDATES)
def test_bf16_long_input_stays_finite_and_accurate(update):
    """Memory sums over a long input are kept in float32: no overflow, no stagnation."""
    s, b, hq, hkv, dk, dv, N = 32768, 1, 2, 1, 16, 16, 512
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(s, b, hq, dk, generator=g) * 3).bfloat16()
    k = (torch.randn(s, b, hkv, dk, generator=g) * 3 + 2).bfloat16()  # large positive keys: big z
    v = (torch.randn(s, b, hkv, dv, generator=g) * 3).bfloat16()
    gate = torch.zeros(hq, dtype=torch.bfloat16)
    out, (M, z) = infini_attention(q, k, v, gate, segment_length=N, update=update)
    assert torch.isfinite(out).all() and torch.isfinite(M).all() and torch.isfinite(z).all()
    ref_z = (F.elu(k.float()) + 1).sum(0)  # float64-free exact enough reference for z
    _close(z, ref_z, 1e-4, 1e-3, "z after 32K bf16 tokens")
    ref, _ = infini_attention(q.float(), k.float(), v.float(), gate.float(), segment_length=N, update=update)
    _close(out, ref, 3e-2, 3e-2, "bf16 vs fp32 over 32K tokens")


def test_bad_inputs_raise_value_error_naming_the_argument():
    q, k, v, gate, memory = _inputs(16, 2, 4, 2, 8, 8)
    N = 4
    cases = [
        (dict(q=q[0]), "q must be a 4-D"),
        (dict(k=torch.randn(16, 2, 3, 8), v=torch.randn(16, 2, 3, 8)), "multiple of k/v heads"),
        (dict(k=torch.randn(16, 2, 2, 7)), "k must be"),
        (dict(v=torch.randn(15, 2, 2, 8)), "v must be"),
        (dict(gate=torch.zeros(2)), "gate must be"),
        (dict(segment_length=0), "segment_length must be"),
        (dict(segment_length=2.5), "segment_length must be"),
        (dict(update="hebbian"), "update must be one of"),
        (dict(memory=(memory[0][:, :1], memory[1])), "memory M must be"),
        (dict(memory=(memory[0], memory[1][..., :3])), "memory z must be"),
        (dict(memory=(memory[0].double(), memory[1])), "float32"),
        (dict(q_local=torch.randn(16, 2, 4, 7)), "q_local must have"),
        (dict(checkpoint_segments=-1), "checkpoint_segments"),
    ]
    for override, message in cases:
        args = dict(q=q, k=k, v=v, gate=gate, segment_length=N, memory=memory)
        args.update(override)
        impls = [infini_attention] if "checkpoint_segments" in override else [infini_attention, infini_attention_naive]
        for impl in impls:
            with pytest.raises(ValueError, match=message):
                impl(**args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("update", UPDATES)
def test_fast_matches_naive_cuda_bf16(update):
    s, b, hq, hkv, dk, dv, N = 1000, 2, 8, 2, 64, 64, 256
    q, k, v, gate, memory = _inputs(s, b, hq, hkv, dk, dv, dtype=torch.bfloat16)
    dev = [t.detach().cuda().requires_grad_() for t in (q, k, v, gate)]
    mem = tuple(m.detach().cuda() for m in memory)
    out_f, mem_f = infini_attention(*dev, segment_length=N, update=update, memory=mem)
    out_n, mem_n = infini_attention_naive(*dev, segment_length=N, update=update, memory=mem)
    _close(out_f, out_n, 2e-2, 2e-2, "cuda bf16 out")
    _close(mem_f[0], mem_n[0], 1e-4, 1e-3, "cuda M")
