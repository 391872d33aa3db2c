"""tools/convert_hf_llama.py: a tiny random Llama made with `transformers` (no download) becomes
our checkpoint; with memory off and one segment as long as the input, logits equal HF's."""

import os
import sys

import pytest
import torch

from _dist import run_distributed
from train_utils import DEBUG_CONFIG, REPO

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

sys.path.insert(0, os.path.join(REPO, "tools"))


def _tiny_llama(path, tie=False):
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   rope_theta=10000.0, tie_word_embeddings=tie, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return model


def _our_logits(rank, world_size, ckpt, tokens, tp):
    from megatron_infini.inference.loader import load_model_for_inference
    from megatron_infini.streaming import infini_cores

    model, cfg, _ = load_model_for_inference(ckpt, tp=tp)
    gates = [c.gate.detach().clone() if c.gate is not None else None for c in infini_cores(model)]
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1])[None].expand_as(tokens), None,
                       runtime_gather_output=True)
    return logits[..., :200].float(), gates, cfg.model.segment_length


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_hugging_face_with_memory_off(tmp_path, tie):
    from convert_hf_llama import convert

    hf = _tiny_llama(tmp_path / "hf", tie)
    tokens = torch.randint(0, 200, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    ckpt = convert(str(tmp_path / "hf"), DEBUG_CONFIG, str(tmp_path / "ours"),
                   ["model.memory_enabled=false", "model.segment_length=64"], log=lambda m: None)
    for tp in (1, 2):
        outs = run_distributed(_our_logits, tp, ckpt, tokens, tp, tp=tp)
        logits, gates, n = outs[0]
        assert n == 64 and gates == [None, None]
        torch.testing.assert_close(logits, ref, atol=2e-4, rtol=2e-4)


def test_gates_are_initialised_as_configured(tmp_path):
    from convert_hf_llama import convert

    _tiny_llama(tmp_path / "hf")
    ckpt = convert(str(tmp_path / "hf"), DEBUG_CONFIG, str(tmp_path / "ours"),
                   ["model.gate_init=-2.5", "model.segment_length=16"], log=lambda m: None)
    (res,) = run_distributed(_our_logits, 1, ckpt, torch.zeros(1, 20, dtype=torch.long), 1)
    logits, gates, n = res
    assert n == 16 and len(gates) == 2
    for g in gates:
        assert torch.equal(g, torch.full((4,), -2.5))
    assert torch.isfinite(logits).all()
