"""Packed documents (cu_seqlens) in the op: fast == naive == every document run alone, forward
and backward, with GQA, write strengths and both update rules."""

import pytest
import torch

from megatron_infini.ops import infini_attention, infini_attention_naive, local_attention
from megatron_infini.ops.packed import document_positions, packed_layout
from test_ops import UPDATES, _close, _inputs

N = 4
# documents shorter than a segment, exactly one, several (not a multiple), two, one token;
# all but the first start mid-segment of the packed input
LENGTHS = [3, 4, 11, 2, 1, 9]


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _packed_inputs(hq=4, hkv=2, dk=6, dv=5, seed=0):
    s = sum(LENGTHS)
    q, k, v, gate, _ = _inputs(s, 1, hq, hkv, dk, dv, seed=seed, with_memory=False)
    g = torch.Generator().manual_seed(seed + 7)
    ql = torch.randn(q.shape, generator=g).requires_grad_()  # stands for the RoPE'd q / k
    kl = torch.randn(k.shape, generator=g).requires_grad_()
    w = torch.sigmoid(torch.randn(s, 1, hkv, generator=g) * 2).requires_grad_()
    return q, k, v, gate, ql, kl, w


def _alone(impl, q, k, v, gate, ql, kl, w, **kw):
    """Every document run on its own from an empty memory; the last one's memory."""
    cu = _cu(LENGTHS).tolist()
    outs = []
    for a, c in zip(cu, cu[1:]):
        d = slice(a, c)
        out, mem = impl(q[d], k[d], v[d], gate, q_local=ql[d], k_local=kl[d], write=w[d], **kw)
        outs.append(out)
    return torch.cat(outs), mem


def _loss(out, mem, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ((out * torch.randn(out.shape, generator=g)).sum() + (mem[0] * torch.randn(mem[0].shape, generator=g)).sum()
            * 1e-2 + (mem[1] * torch.randn(mem[1].shape, generator=g)).sum() * 1e-2)


def _check(results, leaves):
    (ref_out, ref_mem), *others = results
    ref_g = torch.autograd.grad(_loss(ref_out, ref_mem), leaves)
    for name, (out, mem) in others:
        _close(out, ref_out, 1e-5, 1e-5, f"{name} out")
        _close(mem[0], ref_mem[0], 1e-5, 1e-5, f"{name} M")
        _close(mem[1], ref_mem[1], 1e-5, 1e-5, f"{name} z")
        for lname, a, b in zip("q k v gate q_local k_local write".split(), torch.autograd.grad(_loss(out, mem), leaves),
                               ref_g):
            _close(a, b, 1e-5, 1e-5, f"{name} grad {lname}")


@pytest.mark.parametrize("update", UPDATES)
def test_packed_fast_and_naive_equal_documents_alone(update):
    q, k, v, gate, ql, kl, w = leaves = _packed_inputs()
    kw = dict(segment_length=N, update=update)
    packed = dict(q_local=ql, k_local=kl, write=w, cu_seqlens=_cu(LENGTHS), **kw)
    _check([
        _alone(infini_attention_naive, *leaves, **kw),
        ("fast packed", infini_attention(q, k, v, gate, **packed)),
        ("naive packed", infini_attention_naive(q, k, v, gate, **packed)),
        ("fast packed, checkpointed", infini_attention(q, k, v, gate, checkpoint_segments=2, **packed)),
    ], leaves)


@pytest.mark.slow
@pytest.mark.parametrize("update", UPDATES)
def test_packed_per_segment_chunks_and_no_gqa(update, monkeypatch):
    from megatron_infini.ops import fast

    monkeypatch.setitem(fast.CHUNK_ELEMENTS, "cpu", 1)
    q, k, v, gate, ql, kl, w = leaves = _packed_inputs(hq=3, hkv=3, dk=5, dv=7, seed=4)
    kw = dict(segment_length=N, update=update)
    packed = dict(q_local=ql, k_local=kl, write=w, cu_seqlens=_cu(LENGTHS), **kw)
    _check([
        _alone(infini_attention, *leaves, **kw),
        ("fast packed", infini_attention(q, k, v, gate, **packed)),
        ("fast packed, checkpointed", infini_attention(q, k, v, gate, checkpoint_segments=1, **packed)),
    ], leaves)


def test_packed_first_document_continues_from_memory_later_ones_start_empty():
    q, k, v, gate, _, _, _ = _packed_inputs()
    _, _, _, _, memory = _inputs(1, 1, 4, 2, 6, 5, seed=9)
    cu = _cu(LENGTHS)
    a = cu[1].item()
    out, mem = infini_attention(q, k, v, gate, segment_length=N, memory=memory, cu_seqlens=cu)
    first, _ = infini_attention(q[:a], k[:a], v[:a], gate, segment_length=N, memory=memory)
    rest, mem_rest = infini_attention(q[a:], k[a:], v[a:], gate, segment_length=N, cu_seqlens=cu[1:] - a)
    _close(out, torch.cat([first, rest]), 1e-5, 1e-5, "out")
    _close(mem[0], mem_rest[0], 1e-6, 1e-6, "M")


def test_packed_local_attention_equals_documents_alone():
    q, k, v, *_ = _packed_inputs()
    cu = _cu(LENGTHS).tolist()
    got = local_attention(q, k, v, N, cu_seqlens=_cu(LENGTHS))
    ref = torch.cat([local_attention(q[a:c], k[a:c], v[a:c], N) for a, c in zip(cu, cu[1:])])
    _close(got, ref, 1e-6, 1e-6, "local attention")


def test_one_document_is_the_unpacked_op():
    q, k, v, gate, *_ = _packed_inputs()
    s = q.shape[0]
    ref, (M, _) = infini_attention(q, k, v, gate, segment_length=N, update="delta")
    got, (M2, _) = infini_attention(q, k, v, gate, segment_length=N, update="delta",
                                    cu_seqlens=torch.tensor([0, s], dtype=torch.int32))
    _close(got, ref, 1e-6, 1e-6, "out")
    _close(M2, M, 1e-6, 1e-6, "M")


def test_layout_and_positions():
    layout = packed_layout(_cu([3, 4, 6]), 13, 1, 4)
    assert layout.n == 4 and layout.N == 4
    assert layout.index.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert layout.doc_start.tolist() == [-1, 1, 2, 2]
    assert layout.packing.lengths == (3, 4, 4, 2) and layout.packing.resets == {1, 2}
    assert document_positions(_cu([3, 4, 6]), 13).tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("cu, s, b, match", [
    ([0, 3, 3, 8], 8, 1, "strictly increasing"),
    ([0, 3, 7], 8, 1, "end at the sequence length"),
    ([1, 3, 8], 8, 1, "start at 0"),
    ([0, 3, 8], 8, 2, "batch size 1"),
])
def test_bad_cu_seqlens_are_refused(cu, s, b, match):
    q, k, v, gate, _ = _inputs(s, b, 2, 1, 4, 4, with_memory=False)
    with pytest.raises(ValueError, match=match):
        infini_attention(q, k, v, gate, segment_length=4, cu_seqlens=torch.tensor(cu))
    with pytest.raises(ValueError, match="1-D integer"):
        infini_attention(q, k, v, gate, segment_length=4, cu_seqlens=torch.tensor([0.0, 8.0]))


@pytest.mark.parametrize("update", UPDATES)
def test_rank_shares_run_rank_after_rank_equal_the_whole_packed_op(update):
    """The context-parallel plan (`ops.packed.rank_shares`) run rank after rank in one process: each
    rank's rows before its tail (head included) from the state the previous rank handed on (where
    its first document continues), its tail as its own segment from the state before it; the own
    rows' outputs equal the whole packed op's. Linear rule: the state handed on is also the sum of
    the ranks' `last`-document deltas from `first` on (what the all-gather adds up). Random
    layouts, 2-4 ranks, documents spanning several ranks, boundaries mid-segment."""
    from megatron_infini.ops import memory_delta
    from megatron_infini.ops.packed import rank_shares

    g = torch.Generator().manual_seed(3)
    cuts = 0
    for cp, s_local, seg in [(2, 12, 4), (3, 8, 8), (4, 6, 4), (4, 5, 5)]:
        S = cp * s_local
        q, k, v, gate, _ = _inputs(S, 1, 4, 2, 6, 5, seed=cp, with_memory=False)
        for _ in range(4):
            inner = torch.randperm(S - 1, generator=g)[:int(torch.randint(0, 6, (1,), generator=g))] + 1
            cu = [0, *sorted(inner.tolist()), S]
            ref, _ = infini_attention(q, k, v, gate, segment_length=seg, update=update,
                                      cu_seqlens=torch.tensor(cu, dtype=torch.int32))
            shares = rank_shares(cu, s_local, cp, seg)
            outs, handed, deltas = [], None, []
            for r, sh in enumerate(shares):
                assert sh.head == (shares[r - 1].tail if r else 0) and sh.tail < seg
                lo, L = r * s_local - sh.head, sh.head + s_local
                main = L - sh.tail
                local = sh.cu_seqlens.tolist()
                assert local[-1] == L and all(a + lo in cu for a in local[1:-1])
                x = slice(lo, lo + main)
                if update == "linear" and sh.first < r:
                    total = sum(d[0] for d in deltas[sh.first:r])
                    _close(total, handed[0], 1e-5, 1e-5, "linear prefix sum M")
                out, mem = infini_attention(q[x], k[x], v[x], gate, segment_length=seg, update=update,
                                            memory=handed if sh.first < r else None,
                                            cu_seqlens=torch.tensor([a for a in local if a < main] + [main]))
                deltas.append(memory_delta(k[lo + sh.last:lo + main], v[lo + sh.last:lo + main]))
                handed = mem
                if sh.tail:
                    cuts += 1
                    t = slice(lo + main, lo + L)
                    out_t, _ = infini_attention(q[t], k[t], v[t], gate, segment_length=seg, update=update,
                                                memory=None if sh.tail_starts_document else mem)
                    out = torch.cat([out, out_t])
                outs.append(out[sh.head:])
            _close(torch.cat(outs), ref, 1e-5, 1e-5, f"cp {cp}, cu {cu}")
    assert cuts > 10  # most layouts cut segments
    with pytest.raises(ValueError, match="at least segment_length"):  # a segment could span three ranks
        rank_shares([0, 3, 24], 6, 4, 8)
