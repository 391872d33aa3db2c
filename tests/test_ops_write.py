"""Write strengths (the memory write gate): the fast op against the paper's segment loop."""

import pytest
import torch

from megatron_infini.ops import infini_attention, infini_attention_naive
from test_ops import SHAPES, UPDATES, _close, _grads, _inputs, chunking  # noqa: F401  (fixture)


def _write(s, b, hkv, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.sigmoid(torch.randn(s, b, hkv, generator=g) * 2).requires_grad_()


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fast_matches_naive_with_write_strengths(shape, update, chunking):
    s, b, hq, hkv, dk, dv, N = shape
    q, k, v, gate, memory = _inputs(s, b, hq, hkv, dk, dv)
    w = _write(s, b, hkv)
    leaves = [q, k, v, gate, w, *memory]
    kw = dict(segment_length=N, update=update, memory=memory, write=w)
    out_f, mem_f = infini_attention(q, k, v, gate, **kw)
    out_n, mem_n = infini_attention_naive(q, k, v, gate, **kw)
    _close(out_f, out_n, 1e-5, 1e-5, "out")
    _close(mem_f[0], mem_n[0], 1e-5, 1e-5, "M")
    _close(mem_f[1], mem_n[1], 1e-5, 1e-5, "z")
    for name, gf, gn in zip("q k v gate w M z".split(), _grads(out_f, mem_f, leaves), _grads(out_n, mem_n, leaves)):
        _close(gf, gn, 1e-4, 1e-5, f"grad {name}")


@pytest.mark.parametrize("impl", [infini_attention, infini_attention_naive], ids=["fast", "naive"])
@pytest.mark.parametrize("update", UPDATES)
def test_constant_write_strength_is_the_paper(impl, update):
    """M and z scale together, so a constant strength changes nothing but the state's scale."""
    s, b, hq, hkv, dk, dv, N = 40, 2, 4, 2, 6, 5, 8
    q, k, v, gate, _ = _inputs(s, b, hq, hkv, dk, dv, with_memory=False)
    ref, (M, z) = impl(q, k, v, gate, segment_length=N, update=update)
    got, (Mw, zw) = impl(q, k, v, gate, segment_length=N, update=update, write=torch.full((s, b, hkv), 0.25))
    _close(got, ref, 1e-4, 1e-5, "out")
    _close(Mw, 0.25 * M, 1e-5, 1e-5, "M")
    _close(zw, 0.25 * z, 1e-5, 1e-5, "z")


@pytest.mark.parametrize("update", UPDATES)
def test_zero_write_strength_stores_nothing(update):
    """A token written with strength 0 leaves no trace: the memory equals the one built without it."""
    s, b, hq, hkv, dk, dv, N = 24, 1, 2, 2, 4, 4, 8
    q, k, v, gate, memory = _inputs(s, b, hq, hkv, dk, dv)
    w = torch.ones(s, b, hkv)
    w[8:16] = 0.0  # the whole second segment is skipped
    _, (M, z) = infini_attention(q, k, v, gate, segment_length=N, update=update, memory=memory, write=w)
    keep = torch.cat([torch.arange(8), torch.arange(16, 24)])
    _, (M2, z2) = infini_attention(q[keep], k[keep], v[keep], gate, segment_length=N, update=update, memory=memory)
    _close(M, M2, 1e-5, 1e-5, "M")
    _close(z, z2, 1e-5, 1e-5, "z")


@pytest.mark.parametrize("update", UPDATES)
def test_write_strengths_with_activation_checkpointing(update):
    s, b, hq, hkv, dk, dv, N = 45, 2, 4, 2, 8, 8, 6
    q, k, v, gate, memory = _inputs(s, b, hq, hkv, dk, dv)
    w = _write(s, b, hkv)
    leaves = [q, k, v, gate, w, *memory]
    ref = infini_attention(q, k, v, gate, segment_length=N, update=update, memory=memory, write=w)
    got = infini_attention(q, k, v, gate, segment_length=N, update=update, memory=memory, write=w, checkpoint_segments=2)
    _close(got[0], ref[0], 1e-6, 1e-6, "out")
    for name, gc, gr in zip("q k v gate w M z".split(), _grads(got[0], got[1], leaves), _grads(ref[0], ref[1], leaves)):
        _close(gc, gr, 1e-5, 1e-6, f"grad {name}")


def test_bad_write_strengths_raise():
    q, k, v, gate, _ = _inputs(16, 2, 4, 2, 4, 4, with_memory=False)
    with pytest.raises(ValueError, match="write"):
        infini_attention(q, k, v, gate, segment_length=8, write=torch.ones(16, 2, 4))
    with pytest.raises(ValueError, match="write"):
        infini_attention_naive(q, k, v, gate, segment_length=8, write=torch.ones(16, 2, 2, dtype=torch.long))
