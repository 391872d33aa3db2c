"""Context parallelism (memory relay) on CPU with gloo: CP=2 equals CP=1, TP=2 x CP=2 equals TP=1.

The reference is the same model (same seed, same weights) at CP=1 in the same processes: every
rank computes it on the whole input. Under CP each rank feeds its contiguous block of tokens
(`split_for_context_parallel`), losses are the sum over all tokens / all tokens, and parameter
gradients are summed over the CP group (what a data-parallel wrapper over the dp x cp group
does). Tiny fp32 model: 2 layers, hidden 64, 4 query heads, 2 key/value groups, sequence 64
with segment 16 (two segments per CP rank).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _dist import TOL, assert_same, gather_full, reinit_model_parallel, run_distributed
from torch.testing import assert_close

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=128, segment_length=16, use_cpu_initialization=True)
VOCAB, S, B = 128, 64, 2
GATES = torch.tensor([-1.0, -0.3, 0.4, 1.2])


def _ps():
    from megatron.core import parallel_state as ps

    return ps


def build(seed=0, **fields):
    from megatron.core.models.gpt import GPTModel

    from megatron_infini import get_gpt_block_infini_spec, llama_config
    from megatron_infini.parallel import setup_context_parallel

    ps = _ps()
    tp, cp = ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()
    cfg = llama_config(**{**TINY, "tensor_model_parallel_size": tp, "context_parallel_size": cp, **fields})
    torch.manual_seed(seed)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_block_infini_spec(cfg), vocab_size=VOCAB,
                     max_sequence_length=S, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    setup_context_parallel(model)
    n, r = GATES.numel() // tp, ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("core_attention.gate"):
                p.copy_(GATES[r * n:(r + 1) * n])
    return model


def data(seed=1, s=S):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, s), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


def _gather(t, group, dim):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def step(model, ids, labels):
    """Forward/backward of the mean token loss over the *whole* sequence, on this rank's block;
    returns whole-sequence logits, loss and gathered, CP-summed gradients."""
    from megatron_infini.parallel import split_for_context_parallel

    ps = _ps()
    cp_group, tp_group = ps.get_context_parallel_group(), ps.get_tensor_model_parallel_group()
    n = model.config.segment_length
    ids_l, labels_l = (split_for_context_parallel(t, 1, cp_group, n) for t in (ids, labels))
    pos = torch.arange(ids.shape[1])[split_for_context_parallel(torch.arange(ids.shape[1]), 0, cp_group, n)]
    model.zero_grad()
    per_token = model(ids_l, pos.expand_as(ids_l), None, labels=labels_l)  # [b, s / cp]
    loss = per_token.sum() / ids.numel()
    loss.backward()
    with torch.no_grad():
        logits = model(ids_l, pos.expand_as(ids_l), None)  # [b, s / cp, V / tp]
        logits = _gather(_gather(logits, tp_group, -1), cp_group, 1)
        total = loss.detach().clone()
        dist.all_reduce(total, group=cp_group)
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad.detach().clone()
            dist.all_reduce(g, group=cp_group)  # the dp x cp gradient reduction
            grads[name] = gather_full(g, p)
    return dict(loss=total, logits=logits, grads=grads)


def _refs(ids, labels):
    refs = {u: step(build(memory_update=u), ids, labels) for u in ("linear", "delta")}
    assert not torch.allclose(refs["linear"]["loss"], refs["delta"]["loss"]), "update rule ignored"
    return refs


# ----------------------------------------------------------------------------- CP = 2
def _cp2_checks(rank, world_size):
    from megatron_infini.parallel import CommCounter
    from megatron_infini.streaming import infini_cores, set_memory_carry

    ids, labels = data()
    refs = _refs(ids, labels)
    ref_ckpt = step(build(memory_update="linear", memory_enabled=False), ids, labels)

    reinit_model_parallel(tp=1, context_parallel_size=2)
    for u in ("linear", "delta"):
        model = build(memory_update=u)
        counter = CommCounter()
        for core in infini_cores(model):
            core.cp_relay.counter = counter
        assert_same(step(model, ids, labels), refs[u], f"CP=2 vs CP=1 ({u})")
        # b * hkv * dk * (dv + 1) float32 numbers per layer per message, never the keys/values
        numel = B * 2 * 16 * 17
        if u == "linear":  # fwd all-gather x2 (step + logits), bwd all-gather x1, per layer
            assert counter.bytes_by_kind == {"allgather_fwd": 2 * 2 * numel * 4, "allgather_bwd": 2 * numel * 4}
        elif rank == 0:  # rank 0 sends its final state forward
            assert counter.bytes_by_kind == {"p2p_fwd": 2 * 2 * numel * 4}
        else:  # rank 1 sends the gradient of its initial state back
            assert counter.bytes_by_kind == {"p2p_bwd": 2 * numel * 4}
    # activation checkpointing inside the op (memory taken before the local attention)
    assert_same(step(build(memory_update="linear", checkpoint_segments=1), ids, labels), refs["linear"],
                "CP=2 + checkpoint_segments=1")
    assert_same(step(build(memory_update="delta", checkpoint_segments=1), ids, labels), refs["delta"],
                "CP=2 delta + checkpoint_segments=1")
    assert_same(step(build(memory_update="linear", memory_enabled=False), ids, labels), ref_ckpt,
                "CP=2 memory off")

    # clear errors
    model = build()
    ids_l = ids[:, :24]  # 24 tokens per rank with segment 16
    with pytest.raises(ValueError, match="whole segments"):
        model(ids_l, torch.arange(24).expand_as(ids_l), None)
    set_memory_carry(model, True)
    with pytest.raises(ValueError, match="memory carry"):
        model(ids[:, :32], torch.arange(32).expand_as(ids[:, :32]), None)
    # Megatron's load-balanced slice of the RoPE table (s / cp rows) reaching the layer
    attn = build().decoder.layers[0].self_attention
    hidden = torch.randn(32, B, TINY["hidden_size"])
    with pytest.raises(ValueError, match="setup_context_parallel"):
        attn(hidden, None, rotary_pos_emb=torch.zeros(32, 1, 1, 16))
    return True


def test_cp2_equals_cp1_both_rules():
    """Output, loss and every parameter gradient of CP=2 equal CP=1 (linear and delta),
    bytes counted, errors for partial segments, memory carry and an unprepared model."""
    assert run_distributed(_cp2_checks, 2, tp=1) == [True, True]


# ------------------------------------------------------------------------ TP=2 x CP=2
def _tp2_cp2_checks(rank, world_size):
    ids, labels = data()
    refs = _refs(ids, labels)
    reinit_model_parallel(tp=2, context_parallel_size=2)
    ps = _ps()
    assert ps.get_context_parallel_world_size() == 2 and ps.get_tensor_model_parallel_world_size() == 2
    for u in ("linear", "delta"):
        assert_same(step(build(memory_update=u), ids, labels), refs[u], f"TP=2 x CP=2 vs TP=1 x CP=1 ({u})")
    assert_same(step(build(memory_update="linear", sequence_parallel=True), ids, labels), refs["linear"],
                "TP=2 + SP x CP=2 vs TP=1 x CP=1")
    return True


def test_tp2_cp2_equals_tp1_cp1():
    assert run_distributed(_tp2_cp2_checks, 4, tp=1) == [True] * 4


# --------------------------------------------------------------------------- single process
def test_memory_delta_is_the_linear_final_memory():
    from megatron_infini.ops import infini_attention, infini_attention_deferred, infini_attention_naive, memory_delta

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(37, 2, h, 8, generator=g) for h in (4, 2, 2))
    gate = torch.randn(4, generator=g)
    out, (M, z) = infini_attention_naive(q, k, v, gate, segment_length=8)  # independent of the fast op's code
    dM, dz = memory_delta(k, v)
    assert_close(dM, M, **TOL)
    assert_close(dz, z, **TOL)
    for update in ("linear", "delta"):  # deferred memory = memory passed in
        M0 = (torch.rand(2, 2, 8, 8, generator=g), torch.rand(2, 2, 8, generator=g))
        want = infini_attention(q, k, v, gate, segment_length=8, update=update, memory=M0)
        got = infini_attention_deferred(q, k, v, gate, segment_length=8, update=update, get_memory=lambda: M0)
        assert_close(got[0], want[0], **TOL)
        assert_close(got[1][0], want[1][0], **TOL)


def test_contiguous_chunk_errors():
    from megatron_infini.parallel import contiguous_chunk

    assert contiguous_chunk(64, 1, 2, 16) == slice(32, 64)
    with pytest.raises(ValueError, match="split evenly"):
        contiguous_chunk(65, 0, 2)
    with pytest.raises(ValueError, match="cp \\* segment_length = 32"):
        contiguous_chunk(48, 0, 2, 16)


# --------------------------------------------------------------------------- the trainer
def test_trainer_cp2_matches_cp1_and_resumes(tmp_path):
    """configs/debug.yaml (256 tokens, segment 64): CP=2 on 2 ranks logs the losses of CP=1 on
    one rank (loss averaged over the CP group, gradients over dp x cp); 2 steps + save + resume
    to 4 equals 4 steps straight."""
    from train_utils import train

    fast = ["train.eval_interval=0", "checkpoint.save_interval=0"]
    cp2 = ["parallel.context_parallel_size=2"]
    ref = train(tmp_path / "cp1", "train.steps=4", *fast, nproc=1)
    assert ref.returncode == 0, ref.output[-3000:]
    run = train(tmp_path / "cp2", "train.steps=4", *fast, *cp2)
    assert run.returncode == 0, run.output[-3000:]
    assert len(run.losses) == 4
    assert run.losses == pytest.approx(ref.losses, rel=1e-4, abs=1e-4)

    first = train(tmp_path / "resumed", "train.steps=2", *fast, *cp2)
    assert first.returncode == 0, first.output[-3000:]
    resumed = train(tmp_path / "resumed", "train.steps=4", *fast, *cp2)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert resumed.losses == pytest.approx(run.losses, rel=1e-5, abs=1e-5)
