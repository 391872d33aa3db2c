"""Infini-attention inside Megatron-core GPTModel, on CPU with gloo (2 processes).

Independent references: the same weights at TP=1 (gathered TP=2 tensors must match them),
Megatron's local spec with a plain SDPA causal core attention (memory off), and one call over
the whole input (streaming). All checks of a parallel layout share one spawned run to keep
the suite fast. Tiny fp32 model: 2 layers, hidden 64, 4 query heads, 2 key/value groups,
sequence 40 with segment 16 (segments 16, 16, 8).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist import TOL, assert_same, gather_full, reinit_model_parallel, run_distributed
from _dist import full_logits as logits
from torch.testing import assert_close

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=128, segment_length=16, use_cpu_initialization=True)
VOCAB, S, B = 128, 40, 2
GATES = torch.tensor([-1.0, -0.3, 0.4, 1.2])  # distinct per head: a head mix-up shows
#: GPT-2 style (LayerNorm with bias, GELU, biases) with per-head q/k LayerNorm.
GPT2_QK = dict(normalization="LayerNorm", gated_linear_unit=False, activation_func=F.gelu,
               add_bias_linear=True, qk_layernorm=True, memory_update="delta")


# ----------------------------------------------------------------------------- helpers
def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def build(seed=0, layer_spec=False, **fields):
    """Tiny GPTModel with the block spec (or the layer spec), at the current TP size."""
    from megatron.core.models.gpt import GPTModel

    from megatron_infini import get_gpt_block_infini_spec, get_gpt_layer_infini_spec, llama_config

    tp, rank = _tp()
    cfg = llama_config(**{**TINY, "tensor_model_parallel_size": tp, **fields})
    qk = cfg.qk_layernorm
    spec = get_gpt_layer_infini_spec(qk_layernorm=qk) if layer_spec else get_gpt_block_infini_spec(cfg, qk)
    torch.manual_seed(seed)
    model = GPTModel(config=cfg, transformer_layer_spec=spec,
                     vocab_size=VOCAB, max_sequence_length=S, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    n = GATES.numel() // tp
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("core_attention.gate"):
                p.copy_(GATES[rank * n:(rank + 1) * n])
    return model


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    return ids, torch.roll(ids, -1, dims=1)




def step(model, ids, labels):
    """Logits, loss and full (gathered) parameters and gradients of one forward/backward."""
    model.zero_grad()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    loss = model(ids, pos, None, labels=labels).mean()
    loss.backward()
    return dict(
        logits=logits(model, ids), loss=loss.detach(),
        params={n: gather_full(p, p) for n, p in model.named_parameters()},
        grads={n: gather_full(p.grad, p) for n, p in model.named_parameters()},
    )


# ----------------------------------------------------- reference: ordinary causal attention
class SDPACoreAttention(torch.nn.Module):
    """Plain causal softmax attention over the whole sequence (Megatron core-attention API)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, cp_comm_type=None,
                 softmax_scale=None, pg_collection=None):
        super().__init__()

    def mask(self, s: int):
        """[s, s] bool mask of the (query, key) pairs attended, or None: causal."""
        return None

    def forward(self, q, k, v, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        s, b = q.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [s, b, h, d] -> (b, h, s, d)
        mask = self.mask(s)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.device),
                                             is_causal=mask is None, enable_gqa=True)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # (b, h, s, d) -> [s, b, h * d]


def check_memory_off_equals_causal_attention():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_infini.config import LLAMA_DEFAULTS

    ids, _ = data()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    fields = {k: v for k, v in TINY.items() if k != "segment_length"}
    ref = GPTModel(config=TransformerConfig(**LLAMA_DEFAULTS, **fields, attention_dropout=0.0),
                   transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=S,
                   position_embedding_type="rope", share_embeddings_and_output_weights=False)
    for n in (S, 64):  # one segment holding the whole input (N = S and N > S)
        model = build(memory_enabled=False, segment_length=n)
        ref.load_state_dict(model.state_dict(), strict=True)  # same parameters, same names
        assert_close(logits(model, ids), logits(ref, ids), **TOL)
    # Memory off, several segments: each segment is an independent causal attention with
    # positions from 0, i.e. the reference run on each segment alone.
    model = build(memory_enabled=False, segment_length=16)
    ref.load_state_dict(model.state_dict(), strict=True)
    want = torch.cat([logits(ref, ids[:, a:a + 16]) for a in range(0, S, 16)], dim=1)
    assert_close(logits(model, ids), want, **TOL)


# ------------------------------------------------------------------------- streaming
def check_streaming(update, cut=16):
    from megatron_infini.streaming import reset_memory, set_memory_carry

    model = build(memory_update=update)
    ids, _ = data()
    whole = logits(model, ids)
    set_memory_carry(model, True)
    parts = [logits(model, ids[:, :cut]), logits(model, ids[:, cut:])]
    assert_close(torch.cat(parts, dim=1), whole, **TOL, msg=lambda m: f"streaming {update}\n{m}")
    reset_memory(model)  # a fresh document: the second chunk alone no longer matches
    alone = logits(model, ids[:, cut:])
    assert not torch.allclose(alone, whole[:, cut:], **TOL), "memory had no effect"
    return model


# ------------------------------------------------------------------------- the runs
BIAS = "decoder.layers.0.self_attention.linear_proj.bias"


def _megatron_finalize(model):
    """What Megatron DDP's finalize_model_grads does to non-TP-split grads across TP ranks."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads

    model.ddp_config = DistributedDataParallelConfig()
    _allreduce_non_tensor_model_parallel_grads([model], model.config)


def _check_ddp_does_not_double_reduce(model, cfg):
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    _megatron_finalize(model)
    for n, p in model.named_parameters():
        assert_close(p.grad, before[n], **TOL, msg=lambda m: f"Megatron DDP changed grad {n}\n{m}")


def _tp_sp_ckpt_stream_checks(rank, world_size, ckpt_dir, mem_dir):
    from megatron.core import dist_checkpointing

    from megatron_infini.layers import allreduce_sequence_parallel_grads
    from megatron_infini.streaming import (
        load_memory_state_dict, memory_sharded_state_dict, set_memory_carry,
    )

    ids, labels = data()
    # --- TP=1 references (the helper started at TP=1; both ranks compute the same)
    ref = {u: step(build(memory_update=u), ids, labels) for u in ("linear", "delta")}
    assert not torch.allclose(ref["linear"]["loss"], ref["delta"]["loss"]), "update rule ignored"
    ref["gpt2_qk"] = step(build(**GPT2_QK), ids, labels)
    assert_same(step(build(checkpoint_segments=1), ids, labels), ref["linear"], "checkpoint_segments=1")
    # The layer spec (Megatron's own final norm) builds the same model as the block spec.
    assert_close(logits(build(layer_spec=True), ids), ref["linear"]["logits"], **TOL)
    check_memory_off_equals_causal_attention()
    for u in ("linear", "delta"):
        check_streaming(u)
    with pytest.raises(ValueError, match="recompute_granularity"):
        set_memory_carry(build(recompute_granularity="full", recompute_method="uniform",
                               recompute_num_layers=1), True)

    # --- TP=2: same weights, equal logits, loss, gradients
    reinit_model_parallel(tp=2)
    for u in ("linear", "delta"):
        res = step(build(memory_update=u), ids, labels)
        for n in ref[u]["params"]:
            assert_close(res["params"][n], ref[u]["params"][n], rtol=0, atol=0, msg=f"init differs: {n}")
        assert_same(res, ref[u], f"TP=2 vs TP=1 ({u})")
    assert_same(step(build(**GPT2_QK), ids, labels), ref["gpt2_qk"], "TP=2 LayerNorm/GELU/qk-norm vs TP=1")

    # --- TP=2 + sequence parallel (and qk-norm off): equal to SP off / TP=1
    model = build(memory_update="linear", sequence_parallel=True)
    assert_same(step(model, ids, labels), ref["linear"], "TP=2 + SP vs TP=1")
    # the issue's own snippet: the *layer* spec with sequence parallel, no Apex/TE
    assert_same(step(build(memory_update="linear", sequence_parallel=True, layer_spec=True), ids, labels),
                ref["linear"], "layer spec, TP=2 + SP vs TP=1")
    _check_ddp_does_not_double_reduce(model, model.config)
    # LayerNorm biases, per-head q/k norms, and Megatron's own SP-marked params (row-parallel
    # biases), whose grads Megatron DDP reduces (finalize) and other wrappers must reduce.
    model = build(**GPT2_QK, sequence_parallel=True)
    res = step(model, ids, labels)
    assert not torch.allclose(res["grads"][BIAS], ref["gpt2_qk"]["grads"][BIAS])  # not yet reduced
    with torch.no_grad():  # the Megatron-DDP path
        saved = {n: p.grad.clone() for n, p in model.named_parameters()}
        _megatron_finalize(model)
        res_ddp = dict(res, grads={n: gather_full(p.grad, p) for n, p in model.named_parameters()})
        for n, p in model.named_parameters():
            p.grad.copy_(saved[n])
        assert allreduce_sequence_parallel_grads(model) == 2 * TINY["num_layers"]  # 2 row-parallel biases per layer
        res_ds = dict(res, grads={n: gather_full(p.grad, p) for n, p in model.named_parameters()})
    assert_same(res_ddp, ref["gpt2_qk"], "TP=2 + SP, LayerNorm/GELU/qk-norm, Megatron finalize vs TP=1")
    assert_same(res_ds, ref["gpt2_qk"], "TP=2 + SP, LayerNorm/GELU/qk-norm, reduce helper vs TP=1")

    # --- streaming at TP=2; save the memory after the first chunk (split by head)
    model = check_streaming("delta")
    set_memory_carry(model, True)
    logits(model, ids[:, :16])
    dist_checkpointing.save(memory_sharded_state_dict(model), mem_dir)
    whole = logits(build(memory_update="delta"), ids)

    # --- dist_checkpointing: save at TP=2, load at TP=2 and TP=1
    model = build(memory_update="delta")
    want = logits(model, ids)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    other = build(seed=123, memory_update="delta")
    assert not torch.allclose(logits(other, ids), want, **TOL)
    other.load_state_dict(dist_checkpointing.load(other.sharded_state_dict(), ckpt_dir))
    assert_close(logits(other, ids), want, **TOL, msg=lambda m: f"reload at TP=2\n{m}")

    reinit_model_parallel(tp=1)
    other = build(seed=123, memory_update="delta")
    other.load_state_dict(dist_checkpointing.load(other.sharded_state_dict(), ckpt_dir))
    assert_close(logits(other, ids), want, **TOL, msg=lambda m: f"TP=2 checkpoint at TP=1\n{m}")

    # --- memory saved at TP=2 x DP=1 resumed at TP=1 x DP=2 (one sample per rank)
    set_memory_carry(other, True)
    loaded = dist_checkpointing.load(memory_sharded_state_dict(other, local_batch_size=1), mem_dir)
    load_memory_state_dict(other, loaded)
    mine = slice(rank, rank + 1)
    assert_close(logits(other, ids[mine, 16:]), whole[mine, 16:], **TOL,
                 msg=lambda m: f"memory resumed across TP/DP\n{m}")
    return True


def test_tp_sp_checkpoint_streaming(tmp_path):
    """TP=1 vs TP=2 (both rules, GQA), SP on/off, memory-off vs SDPA, streaming, checkpoints."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "mem").mkdir()
    assert run_distributed(_tp_sp_ckpt_stream_checks, 2, str(tmp_path / "ckpt"), str(tmp_path / "mem"), tp=1) == [True, True]
