"""Megatron's fusions and Transformer Engine's fused norms: what the configuration chooses.

Transformer Engine is not installed on the CPU machines: the choices are tested by what the
spec functions would build (`_te_layer_spec` stood in), the gradient hook of the fused norms
under sequence parallelism on two gloo processes against the sum of the per-rank gradients,
and the real TE model behind `gpu`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _dist import run_distributed

from megatron_infini.fusions import FUSION_FIELDS, fusion_fields


def test_fusion_choice():
    assert not any(fusion_fields(cuda=False, transformer_engine=True).values())  # CPU: none
    assert not any(fusion_fields("off", cuda=True, transformer_engine=True).values())
    gpu = fusion_fields(cuda=True, transformer_engine=False)  # Llama: SwiGLU, no biases
    assert gpu == dict(bias_activation_fusion=True, bias_dropout_fusion=True, apply_rope_fusion=False,
                       masked_softmax_fusion=False, cross_entropy_loss_fusion=True)
    assert fusion_fields(cuda=True, transformer_engine=True)["apply_rope_fusion"] is True
    gelu = dict(activation_func=F.gelu, gated_linear_unit=False, cuda=True, transformer_engine=False)
    assert fusion_fields(**gelu)["bias_activation_fusion"] is False  # Megatron needs a bias to fuse
    assert fusion_fields(**gelu, add_bias_linear=True)["bias_activation_fusion"] is True
    with pytest.raises(ValueError, match="fusions must be one of"):
        fusion_fields("on")


def test_trainer_config_resolves_fusions_for_this_device():
    """The trainer's TransformerConfig carries the resolved fusions (all off on CPU) and a
    model built from it trains (forward and backward)."""
    from megatron_infini.training.config import ConfigError, load_config

    cfg = load_config(None, ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=4",
                             "model.segment_length=8", "train.seq_length=16"])
    with pytest.raises(ConfigError, match="model.fusions"):
        load_config(None, ["model.fusions=on"])
    run_distributed(_train_step, 1, cfg)


def _train_step(rank, world_size, cfg):
    from megatron_infini.training.model import build_model, transformer_config

    tc = transformer_config(cfg, bf16=False)
    expected = fusion_fields(cfg.model.fusions)
    assert {name: getattr(tc, name) for name in FUSION_FIELDS} == expected
    if not torch.cuda.is_available():
        assert not any(expected.values())
    model = build_model(cfg, 128)
    ids = torch.randint(0, 128, (2, 16))
    loss = model(ids, torch.arange(16).expand_as(ids), None, labels=ids).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_te_spec_fuses_norms_under_sequence_parallel(monkeypatch):
    """With TE the block spec fuses the norms into the linear layers with and without sequence
    parallelism (it used to drop the fusion under sequence parallelism)."""
    from megatron_infini import llama_config, spec

    seen = []
    monkeypatch.setattr(spec, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(spec, "_te_layer_spec", lambda qk, fuse_norms, memory_type: seen.append(fuse_norms) or "te")
    for sp in (False, True):
        cfg = llama_config(num_layers=2, hidden_size=32, num_attention_heads=4, segment_length=8,
                           tensor_model_parallel_size=2, sequence_parallel=sp)
        assert spec.get_gpt_block_infini_spec(cfg).submodules.layer_specs == ["te", "te"]
    assert seen == [True, True]


def _hook_check(rank, world_size, path):
    """A parameter used by each rank on its own part of the sequence (as a sequence-parallel
    norm weight): with the hook its gradient is the sum over ranks, on every rank."""
    from megatron_infini.layers.norms import sum_grad_over_tp

    w = torch.nn.Parameter(torch.ones(4))
    sum_grad_over_tp(w)
    parts = [torch.arange(4.0) + 1, torch.full((4,), 10.0)]
    (w * parts[rank]).sum().backward()
    assert torch.equal(w.grad, parts[0] + parts[1])
    assert w.average_gradients_across_tp_domain
    (w * parts[rank]).sum().backward()  # accumulated once more, summed once more
    assert torch.equal(w.grad, 2 * (parts[0] + parts[1]))


def test_fused_norm_grad_summed_over_tp(tmp_path):
    run_distributed(_hook_check, 2, str(tmp_path), tp=2)


@pytest.mark.gpu
def test_te_block_spec_fused_norms_train():
    """On a GPU with Transformer Engine: the block spec builds TE's fused norm + linear (our
    subclass) and a forward/backward gives finite gradients for the fused norm weights."""
    from megatron_infini.spec import have_transformer_engine

    if not torch.cuda.is_available() or not have_transformer_engine():
        pytest.skip("needs CUDA and Transformer Engine")
    run_distributed(_te_check, 1, None)


def _te_check(rank, world_size, _):
    from megatron.core.models.gpt import GPTModel

    from megatron_infini import get_gpt_block_infini_spec, llama_config

    cfg = llama_config(num_layers=2, hidden_size=64, num_attention_heads=4, segment_length=16,
                       params_dtype=torch.bfloat16, bf16=True)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_block_infini_spec(cfg, transformer_impl="transformer_engine"),
                     vocab_size=128, max_sequence_length=64, position_embedding_type="rope").cuda()
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    assert type(qkv).__name__ == "InfiniTELayerNormColumnParallelLinear"
    ids = torch.randint(0, 128, (2, 64), device="cuda")
    model(ids, torch.arange(64, device="cuda").expand_as(ids), None, labels=ids).mean().backward()
    assert torch.isfinite(qkv.layer_norm_weight.grad.float()).all()
