"""The chunked LM head + loss (`ops.linear_cross_entropy`, `layers.lm_loss`) against the
full logits.

References: torch's cross-entropy of the whole logits matrix (op), and Megatron's own output
layer + `vocab_parallel_cross_entropy` on the same model (GPTModel at TP=1 and TP=2, with and
without sequence parallelism, tied and untied embeddings), with per-token loss weights as the
trainer applies them. Chunks do not divide the token count.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _dist import gather_full, run_distributed
from torch.testing import assert_close

from megatron_infini.ops.cross_entropy import linear_cross_entropy

VOCAB, S, B = 256, 24, 2


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_op_matches_full_logits(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(19, 16, generator=g, requires_grad=True)
    weight = torch.randn(37, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 37, (19,), generator=g)
    w = torch.rand(19, generator=g)  # per-token loss weights
    loss = linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    (loss * w).sum().backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy((h2 @ w2.t()).float(), labels, reduction="none")
    (ref * w).sum().backward()
    assert_close(loss, ref)
    assert_close(hidden.grad, h2.grad)
    assert_close(weight.grad, w2.grad)


def test_op_refuses_bad_input():
    h, w = torch.zeros(4, 8), torch.zeros(5, 8)
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), chunk=0)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, torch.zeros(3, dtype=torch.long))


def _build(tp, tie, sp, chunk):
    from megatron.core.models.gpt import GPTModel

    from megatron_infini import get_gpt_block_infini_spec, llama_config
    from megatron_infini.layers.lm_loss import enable_chunked_lm_loss

    cfg = llama_config(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                       segment_length=8, use_cpu_initialization=True, tensor_model_parallel_size=tp,
                       sequence_parallel=sp)
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_block_infini_spec(cfg), vocab_size=VOCAB,
                     max_sequence_length=S, position_embedding_type="rope", share_embeddings_and_output_weights=tie)
    if chunk:
        enable_chunked_lm_loss(model, chunk)
    return model


def _step(model, ids, labels, weights):
    """Weighted mean loss as the trainer computes it, per-token losses and full gradients."""
    from megatron_infini.layers import allreduce_sequence_parallel_grads

    model.zero_grad()
    pos = torch.arange(S).expand_as(ids)
    per_token = model(ids, pos, None, labels=labels)  # [b, s]
    ((per_token.float() * weights).sum() / weights.sum()).backward()
    allreduce_sequence_parallel_grads(model)
    with torch.no_grad():
        logits = model(ids, pos, None)  # no labels: Megatron's output layer
    return per_token.detach(), logits, {n: gather_full(p.grad, p) for n, p in model.named_parameters()}


def _compare(tp, sp, tie, ids, labels, weights):
    from megatron_infini.layers import lm_loss

    calls = []
    op = lm_loss.linear_cross_entropy
    ref = _step(_build(tp, tie, sp, 0), ids, labels, weights)
    lm_loss.linear_cross_entropy = lambda *a, **k: calls.append(1) or op(*a, **k)
    try:
        got = _step(_build(tp, tie, sp, 5), ids, labels, weights)  # 48 tokens: chunks of 5
    finally:
        lm_loss.linear_cross_entropy = op
    assert calls == [1]  # the chunked path ran (once: not for the logits without labels)
    assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[1], ref[1])
    assert ref[2].keys() == got[2].keys()
    for name in ref[2]:
        assert_close(got[2][name], ref[2][name], rtol=1e-5, atol=1e-6, msg=f"tp={tp} sp={sp} tie={tie} {name}")


def _check(rank, world_size, path):
    from _dist import reinit_model_parallel

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    labels, weights = torch.roll(ids, -1, 1), torch.rand(B, S, generator=g)
    for sp, tie in ((False, False), (False, True), (True, False)):  # vocabulary split over the 2 ranks
        _compare(2, sp, tie, ids, labels, weights)
    reinit_model_parallel(tp=1)
    _compare(1, False, False, ids, labels, weights)
    _check_trainer_model(ids, labels)


def _check_trainer_model(ids, labels):
    """The trainer's model.loss_chunk_tokens: the same per-token loss as without."""
    from megatron_infini.training.config import load_config
    from megatron_infini.training.model import build_model

    pos = torch.arange(S).expand_as(ids)
    losses = []
    for chunk in (0, 16):
        cfg = load_config(None, ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=4",
                                 "model.segment_length=8", f"model.loss_chunk_tokens={chunk}", f"train.seq_length={S}"])
        torch.manual_seed(0)
        model = build_model(cfg, VOCAB)
        assert (getattr(model.output_layer, "_chunked_loss", None) is not None) == bool(chunk)
        losses.append(model(ids, pos, None, labels=labels).detach())
    assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_model_loss_tp2_tp1(tmp_path):
    """GPTModel's loss and gradients at TP=2 (with and without sequence parallelism, tied and
    untied embeddings) and TP=1."""
    run_distributed(_check, 2, str(tmp_path), tp=2)
