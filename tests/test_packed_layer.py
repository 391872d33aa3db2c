"""Packed documents through Megatron's own interface: a stock GPTModel with our spec, input
[1, S] and `PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, ...)`, gives per-token losses
and parameter gradients equal to every document run alone from an empty memory.

Documents (segment 8): 5 tokens (shorter than a segment), 8 (exactly one), 19 (several, not a
multiple), 8 (starts mid-segment of the packed input); write strengths on, GQA (4 heads, 2
groups). One spawn of 2 gloo processes: TP=1 (both rules), DeepSpeed ZeRO-1 with the 2 ranks as
data parallel (a different packed sequence on each, both rules), then TP=2 + sequence parallel;
another at CP=2 with a document crossing the rank boundary.
"""

from __future__ import annotations

import os

import pytest
import torch
from _dist import gather_full, reinit_model_parallel, run_distributed
from test_megatron_layer import _tp, build

LENGTHS = [5, 8, 19, 8]
SEG = 8
VOCAB = 128


def _cu():
    return torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)


def packed_params(cu):
    from megatron.core.packed_seq_params import PackedSeqParams

    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def build_packed(update, **fields):
    """Tiny model, segment 8, write strengths with distinct (TP-split) per-group weights."""
    model = build(memory_update=update, segment_length=SEG, memory_write_gate="sigmoid", **fields)
    tp, rank = _tp()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("core_attention.write_weight"):
                full = torch.randn(2, p.shape[1], generator=g) * 0.5  # [groups, hn]
                n = 2 // tp
                p.copy_(full[rank * n:(rank + 1) * n])
    return model


def _grads(model):
    return {n: gather_full(p.grad, p) for n, p in model.named_parameters() if p.grad is not None}


def packed_step(model, ids, labels, cu):
    """Per-token losses [1, S] and full gradients of their sum, the documents packed."""
    model.zero_grad()
    from megatron_infini.ops.packed import document_positions

    pos = document_positions(cu, ids.shape[1]).unsqueeze(0)  # [1, S]: restarting at each document
    losses = model(ids, pos, None, labels=labels, packed_seq_params=packed_params(cu))  # [1, S]
    losses.sum().backward()
    return losses.detach(), _grads(model)


def alone_step(model, ids, labels, cu):
    """The same, every document run alone from an empty memory."""
    model.zero_grad()
    bounds = cu.tolist()
    losses = []
    for a, c in zip(bounds, bounds[1:]):
        pos = torch.arange(c - a).unsqueeze(0)
        loss = model(ids[:, a:c], pos, None, labels=labels[:, a:c])  # [1, L]
        loss.sum().backward()
        losses.append(loss.detach())
    return torch.cat(losses, dim=1), _grads(model)


def _same(got, ref, what):
    from torch.testing import assert_close

    assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: losses\n{m}")
    assert got[1].keys() == ref[1].keys(), what
    for n in ref[1]:
        assert_close(got[1][n], ref[1][n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: grad {n}\n{m}")


def _checks(rank, world_size, tp2_updates, zero=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, sum(LENGTHS)), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    cu = _cu()
    refs = {}
    for update in ("linear", "delta"):
        refs[update] = alone_step(build_packed(update), ids, labels, cu)
        _same(packed_step(build_packed(update), ids, labels, cu), refs[update], f"TP=1 packed ({update})")
    # packing matters: without cu_seqlens the documents see each other
    unpacked = build_packed("linear")(ids, torch.arange(ids.shape[1]).unsqueeze(0), None, labels=labels)
    assert not torch.allclose(unpacked.detach(), refs["linear"][0], atol=1e-3)
    _refusals(ids, cu)
    if zero:  # TP=1 here: data parallel over the 2 ranks
        _zero_checks(rank, world_size, ("linear", "delta"))

    reinit_model_parallel(tp=2)
    for update in tp2_updates:
        got = packed_step(build_packed(update, sequence_parallel=True), ids, labels, cu)
        _same(got, refs[update], f"TP=2 + SP packed ({update})")
    return True


def test_packed_gpt_model_equals_documents_alone_tp1_and_tp2_sp():
    """Both rules at TP=1 and under ZeRO-1 over 2 data-parallel ranks, the linear one at TP=2 + SP
    (the delta one: the slow test below)."""
    assert run_distributed(_checks, 2, ("linear",), tp=1) == [True, True]


@pytest.mark.slow
def test_packed_gpt_model_tp2_sp_both_rules():
    assert run_distributed(_checks, 2, ("linear", "delta"), False, tp=1) == [True, True]


def _refusals(ids, cu):
    """Refusals: carry across calls, qkv_format other than thd, unequal q/kv boundaries."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_infini.streaming import set_memory_carry

    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    model = build_packed("linear")
    n = ids.shape[1]
    for params, match in (
        (PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=n, max_seqlen_kv=n),
         "qkv_format"),
        (PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu // 2, max_seqlen_q=n, max_seqlen_kv=n),
         "cu_seqlens_kv"),
    ):
        with pytest.raises(ValueError, match=match):
            model(ids, pos, None, packed_seq_params=params)
    set_memory_carry(model, True)
    with pytest.raises(ValueError, match="memory carry"):
        model(ids, pos, None, packed_seq_params=packed_params(cu))


# ----------------------------------------------------------------------------- ZeRO-1, DP = 2
#: one packed sequence per data-parallel rank, 40 tokens each, segment 8. Rank 0: LENGTHS;
#: rank 1: 3 (short), 8 starting at 3 (one segment, mid-segment), 21 starting at 11 (several,
#: mid-segment), 8 starting at 32.
DP_LENGTHS = (LENGTHS, [3, 8, 21, 8])
LR = 0.1


def _zero_checks(rank, world_size, updates):
    """Per rank: the engine's per-token losses equal its documents alone; after one plain-SGD
    step every parameter moved by -LR times the DP mean of the documents-alone gradients
    (reduced here with torch.distributed, not DeepSpeed)."""
    import deepspeed
    import torch.distributed as dist
    from torch.testing import assert_close

    from megatron_infini.ops.packed import document_positions
    from megatron_infini.training.engine import MegatronMPU

    os.environ.setdefault("LOCAL_RANK", str(rank))  # deepspeed.initialize insists on it
    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(0, VOCAB, (1, 40), generator=g)  # [1, 40]: this rank's packed sequence
    labels = torch.roll(ids, -1, dims=1)
    cu = torch.tensor([0] + torch.tensor(DP_LENGTHS[rank]).cumsum(0).tolist(), dtype=torch.int32)
    pos = document_positions(cu, 40).unsqueeze(0)  # [1, 40]
    ds_config = {"train_batch_size": world_size, "train_micro_batch_size_per_gpu": 1,
                 "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                 "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
                 "steps_per_print": 10**9}
    for update in updates:
        ref_losses, ref_grads = alone_step(build_packed(update), ids, labels, cu)
        for grad in ref_grads.values():  # the DP mean, without DeepSpeed
            dist.all_reduce(grad)
            grad /= world_size

        model = build_packed(update)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0, weight_decay=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=sgd, config=ds_config, mpu=MegatronMPU(),
                                          dist_init_required=False)
        assert engine.zero_optimization_stage() == 1 and engine.dp_world_size == world_size
        losses = engine(ids, pos, None, labels=labels, packed_seq_params=packed_params(cu))  # [1, 40]
        assert_close(losses.detach(), ref_losses, rtol=1e-5, atol=1e-5,
                     msg=lambda m: f"ZeRO-1 ({update}): losses\n{m}")
        engine.backward(losses.sum())
        engine.step()
        assert ref_grads.keys() == dict(model.named_parameters()).keys()
        for n, p in model.named_parameters():
            applied = (before[n] - p.detach()) / LR  # the gradient the step applied
            # p is rounded to fp32 after the step: |error| <= ulp(p) / LR, ~1e-6 for |p| ~ 1
            assert_close(applied, ref_grads[n], rtol=1e-4, atol=1e-5,
                         msg=lambda m: f"ZeRO-1 ({update}): step of {n}\n{m}")
    return True


# ----------------------------------------------------------------------------- CP = 2
#: 48 tokens over 2 ranks of 24, segment 8. A: document 2 (tokens 8..26) crosses the rank
#: boundary at a segment boundary of its own (16 tokens in); B: the boundary is a document's;
#: C: document 1 (tokens 5..34) crosses it 19 tokens in, mid-segment (3 rows of its segment on
#: rank 0, 5 on rank 1); D: document 1 (tokens 19..24), shorter than a segment, crosses it 5
#: tokens in (its segment starts on rank 0: the tail starts a document).
CP_LAYOUTS = {"A": [3, 5, 19, 8, 13], "B": [5, 11, 8, 13, 11], "C": [5, 30, 13], "D": [19, 6, 23],
              "E": [3, 40, 5]}
#: the rows of rank 0 that rank 1 prepends (its head: the cut segment's part on rank 0), at CP=2
CP_TAIL = {"A": 0, "B": 0, "C": 3, "D": 5}
#: E, at CP=4 (12 tokens a rank): document 1 (tokens 3..42) spans all 4 ranks, each boundary mid-segment
#: (1, 5 and 1 rows cut): ranks 1 and 2 receive a head and send a tail.
#: B and D also have a layer without memory (its local attention on the rank's share of the documents)
MEMORY_LAYERS = {"A": {}, "B": {"memory_layers": (2,)}, "C": {}, "D": {"memory_layers": (2,)},
                 "E": {"memory_layers": (2,)}}


def _cp_checks(rank, world_size, cases):
    """cases: (layout, update rule[, extra config fields of the CP model, e.g. checkpoint_segments])."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from test_context_parallel import build as build_cp

    from megatron_infini.ops.packed import document_positions
    from megatron_infini.parallel import CommCounter
    from megatron_infini.streaming import infini_cores

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (1, 48), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    cus = {k: torch.tensor([0] + torch.tensor(v).cumsum(0).tolist(), dtype=torch.int32) for k, v in CP_LAYOUTS.items()}
    refs = {(lay, u): alone_step(build_cp(memory_update=u, segment_length=SEG, **MEMORY_LAYERS[lay]), ids, labels,
                                 cus[lay]) for lay, u, *_ in cases}

    reinit_model_parallel(tp=1, context_parallel_size=world_size)
    group = ps.get_context_parallel_group()
    n = 48 // world_size
    mine = slice(n * rank, n * (rank + 1))
    for lay, u, *extra in cases:
        model = build_cp(memory_update=u, segment_length=SEG, **MEMORY_LAYERS[lay], **(extra[0] if extra else {}))
        counter = CommCounter()
        for core in infini_cores(model):
            if core.cp_relay is not None:
                core.cp_relay.counter = counter
        cu = cus[lay]
        pos = document_positions(cu, 48)[mine].unsqueeze(0)
        model.zero_grad()
        losses = model(ids[:, mine], pos, None, labels=labels[:, mine], packed_seq_params=packed_params(cu))
        losses.sum().backward()
        parts = [torch.empty_like(losses) for _ in range(world_size)]
        dist.all_gather(parts, losses.detach().contiguous(), group=group)
        grads = {}
        for n, p in model.named_parameters():
            grad = p.grad.detach().clone()
            dist.all_reduce(grad, group=group)  # the dp x cp gradient reduction
            grads[n] = grad
        _same((torch.cat(parts, dim=1), grads), refs[(lay, u)], f"CP={world_size} packed, layout {lay} ({u}) {extra}")
        if u == "linear" and world_size == 2:
            # one [M | z] per memory layer each way (b * hkv * dk * (dv + 1) float32), and the rows of the
            # cut segment on rank 0 (k, v, k_local: b * hkv * 3 * 16 float32 each, fewer than N): flat in length
            cores = list(infini_cores(model))
            state = sum(c.gate is not None for c in cores) * 1 * 2 * 16 * 17 * 4
            want = {"allgather_fwd": state, "allgather_bwd": state}
            rows = sum(2 if c.gate is None else 3 for c in cores) * CP_TAIL[lay] * 1 * 2 * 16 * 4
            if rows:
                want["rows_fwd" if rank == 0 else "rows_bwd"] = rows
            assert counter.bytes_by_kind == want, (counter.bytes_by_kind, want)
    # a rank boundary inside a segment needs ranks of at least segment_length tokens: refused on every rank
    bad = torch.tensor([0, 5, 48], dtype=torch.int32)  # document 1 starts at 5: the boundary is 19 tokens in
    with pytest.raises(ValueError, match="at least segment_length"):
        build_cp(segment_length=32)(ids[:, mine], pos, None, packed_seq_params=packed_params(bad))
    return True


def test_packed_context_parallel_equals_documents_alone():
    """CP=2 with a document crossing the rank boundary at a segment boundary (A, linear), mid-segment
    (C, both rules; D, a document shorter than a segment, delta, with a layer without memory) and with
    a document boundary at the rank boundary (B, delta): per-token losses and gradients equal every
    document alone."""
    cases = [("A", "linear"), ("B", "delta"), ("C", "linear"), ("C", "delta"), ("D", "delta")]
    assert run_distributed(_cp_checks, 2, cases, tp=1) == [True, True]


@pytest.mark.slow
def test_packed_context_parallel_4_ranks():
    """CP=4: a document spans all ranks, every boundary mid-segment (middle ranks both receive and send)."""
    assert run_distributed(_cp_checks, 4, [("E", "linear"), ("E", "delta")], tp=1) == [True] * 4


@pytest.mark.slow
def test_packed_context_parallel_other_combinations():
    cases = [("A", "delta"), ("B", "linear"), ("D", "linear"),
             ("C", "linear", {"checkpoint_segments": 1}), ("C", "delta", {"checkpoint_segments": 2})]
    assert run_distributed(_cp_checks, 2, cases, tp=1) == [True, True]
