"""Auxiliary losses under activation recomputation (tiny GPTModel, one gloo process).

The write-strength penalty (`memory_write_l1`) is a loss term computed inside the attention
layer. Reference: the parameter gradients of loss + penalty without any recomputation.
- `checkpoint_segments` (recomputation inside the op) must give the same gradients;
- Megatron's full-layer recompute runs the layer's forward under no_grad, which drops the
  penalty's gradient: shown here on a config patched past the check, and refused by the config.
The compressive reconstruction loss is refused with either recomputation (tested here too).
"""

from __future__ import annotations

import pytest
import torch
from _dist import run_distributed
from torch.testing import assert_close

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
            segment_length=8, use_cpu_initialization=True, memory_write_gate="hard", memory_write_init=0.3)
VOCAB, S, B, LAM = 64, 24, 2, 0.5
RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def _grads(lam: float = LAM, patch_l1: float = 0.0, **fields):
    """Parameter gradients of mean LM loss + write penalty, and the penalty's value."""
    from megatron.core.models.gpt import GPTModel

    from megatron_infini import get_gpt_block_infini_spec, llama_config
    from megatron_infini.layers.attention import write_penalty

    cfg = llama_config(**{**TINY, "memory_write_l1": lam, **fields})
    if patch_l1:  # past the config's check (it refuses this combination)
        cfg.memory_write_l1 = patch_l1
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_block_infini_spec(cfg), vocab_size=VOCAB,
                     max_sequence_length=S, position_embedding_type="rope", share_embeddings_and_output_weights=False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    pos = torch.arange(S).expand_as(ids)
    loss = model(ids, pos, None, labels=torch.roll(ids, -1, 1)).mean()
    penalty = write_penalty(model)
    (loss if penalty is None else loss + penalty).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, None if penalty is None else penalty.detach()


def _cpu_rng_for_checkpoint():
    """Megatron's CheckpointFunction saves and restores the CUDA RNG state; on CPU there is none
    (the CPU RNG state is still saved and restored)."""
    from megatron.core.tensor_parallel import random

    random._get_cuda_rng_state = lambda *args, **kwargs: None
    random._set_cuda_rng_state = lambda *args, **kwargs: None


def _check(rank, world_size, path):
    ref, pen = _grads()
    assert pen > 0
    seg, pen_seg = _grads(checkpoint_segments=1)
    assert_close(pen_seg, pen)
    for name in ref:
        assert_close(seg[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    # Megatron's full recompute: the penalty is a constant, its gradient is lost
    _cpu_rng_for_checkpoint()
    full, pen_full = _grads(lam=0.0, patch_l1=LAM, **RECOMPUTE)
    assert_close(pen_full, pen)
    assert not pen_full.requires_grad
    bias = [n for n in ref if n.endswith("write_bias")]
    assert bias and all(not torch.allclose(full[n], ref[n]) for n in bias)
    no_penalty, _ = _grads(lam=0.0)  # what full recompute computes: the LM loss's gradients alone
    for n in bias:
        assert_close(full[n], no_penalty[n], rtol=1e-5, atol=1e-6)


def test_write_penalty_gradient_with_recompute(tmp_path):
    """checkpoint_segments keeps the penalty's gradients; Megatron's full recompute would drop them."""
    run_distributed(_check, 1, str(tmp_path))


def test_recompute_with_loss_terms_refused():
    """The configs refuse full recompute with the penalty and with the reconstruction loss."""
    from megatron_infini import llama_config
    from megatron_infini.training.config import ConfigError
    from megatron_infini.training.model_config import ModelConfig

    with pytest.raises(ValueError, match="memory_write_l1.*recompute_granularity"):
        llama_config(**{**TINY, "memory_write_l1": LAM, **RECOMPUTE})
    llama_config(**{**TINY, "memory_write_l1": LAM, "checkpoint_segments": 1})  # accepted
    past = dict(TINY, memory_write_gate="none", memory_type="compressive")
    for bad in (RECOMPUTE, dict(checkpoint_segments=1)):
        with pytest.raises(ValueError, match="not supported with memory_type='compressive'"):
            llama_config(**past, **bad)
    m = ModelConfig(memory_write_gate="hard", memory_write_l1=LAM, recompute_layers=True)
    with pytest.raises(ConfigError, match="model.memory_write_l1.*recompute_layers"):
        m.validate()
