"""tools/convert_hf_llama.py: a tiny random Llama made with `transformers` (no download) becomes
our checkpoint; with memory off and one segment as long as the input, logits equal HF's, also
with Llama 3's RoPE scaling. The Llama 3 scaling of the rotary frequencies equals HF's and
Megatron's. Export back (tools/convert_checkpoint.py to-hf) loads in transformers
(trust_remote_code) and gives the original logits."""

import json
import os
import subprocess
import sys

import pytest
import torch

from _dist import run_distributed
from train_utils import DEBUG_CONFIG, REPO

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

sys.path.insert(0, os.path.join(REPO, "tools"))


# Llama 3 scaling at a scale where it matters for 48 tokens: with head dim 16 and theta 1e4 the
# wavelengths 6.3, 19.9, 62.8, ... fall in all three regimes of original context 32 (low 1, high 4).
TINY_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 32}


def _tiny_llama(path, tie=False, rope_scaling=None, vocab=200):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   rope_theta=10000.0, tie_word_embeddings=tie, max_position_embeddings=128,
                                   rope_scaling=rope_scaling)
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


@pytest.mark.parametrize("tie,rope_scaling", [(False, TINY_ROPE_SCALING), (True, None)],
                         ids=["untied-llama3-rope-scaling", "tied-no-scaling"])
def test_logits_match_hugging_face_with_memory_off(tmp_path, tie, rope_scaling):
    from convert_hf_llama import convert

    hf = _tiny_llama(tmp_path / "hf", tie, rope_scaling)
    tokens = torch.randint(0, 200, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    if rope_scaling:  # the scaling changes these logits: matching them needs it
        unscaled = _tiny_llama(tmp_path / "unscaled", tie, None)
        with torch.no_grad():
            assert (unscaled(tokens).logits - ref).abs().max() > 10 * 2e-4  # 10x the tolerance below
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


@pytest.mark.parametrize("params,head_dim,theta", [
    ({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
     128, 500000.0),                                            # Llama 3.1
    ({"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
     64, 500000.0),                                             # Llama 3.2 1B
    ({"factor": 3.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 64},
     32, 10000.0),                                              # other constants: all three regimes
])
def test_llama3_frequencies_match_hugging_face_and_megatron(params, head_dim, theta):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_infini.rope import llama3_inv_freq

    cfg = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                   rope_theta=theta, max_position_embeddings=131072,
                                   rope_scaling={"rope_type": "llama3", **params})
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert attention_factor == 1.0
    base = RotaryEmbedding(head_dim, 1.0, rotary_base=int(theta), use_cpu_initialization=True).inv_freq
    ours = llama3_inv_freq(base, params["factor"], params["low_freq_factor"], params["high_freq_factor"],
                           params["original_max_position_embeddings"])
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    assert (ours < base).any() and (ours == base).any()  # some frequencies scaled, some not
    if params["low_freq_factor"] == 1.0 and params["original_max_position_embeddings"] == 8192:
        native = RotaryEmbedding(head_dim, 1.0, rotary_base=int(theta), rope_scaling=True,
                                 rope_scaling_factor=params["factor"], use_cpu_initialization=True).inv_freq
        torch.testing.assert_close(ours, native, rtol=1e-6, atol=0)


def test_hf_rope_fields_read_both_config_styles():
    from megatron_infini.checkpointing.convert import hf_rope_config, hf_rope_fields

    v4 = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    v5 = {"rope_parameters": {**v4["rope_scaling"], "rope_theta": 500000.0}}
    want = {"rotary_base": 500000, "rope_scaling": True, "rope_scaling_factor": 32.0,
            "rope_scaling_low_freq_factor": 1.0, "rope_scaling_high_freq_factor": 4.0,
            "rope_scaling_original_max_position": 8192}
    assert hf_rope_fields(v4) == want and hf_rope_fields(v5) == want
    assert hf_rope_config(want) == v4
    assert hf_rope_fields({"rope_theta": 1e4}) == {"rotary_base": 10000, "rope_scaling": False}
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        hf_rope_fields({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def _llama3_style_tokenizer(hf_dir):
    """A tiny byte-level BPE trained with `tokenizers`, laid out as Llama 3's: specials at the end
    of the vocabulary, BOS added by the post-processor, names in tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from megatron_infini.data import CORPUS_DIR

    text = json.loads((CORPUS_DIR / "shakespeare_valid.jsonl").read_text().splitlines()[0])["text"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=398, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])  # ids 398, 399
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 398)])
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": False}))
    return text[:2000]


def test_export_loads_in_transformers_with_its_tokenizer(tmp_path):
    """HF Llama 3-style dir (rope scaling, tokenizer.json) -> ours -> to-hf: LlamaForCausalLM and
    AutoTokenizer load the export as is; its logits are the original model's."""
    from convert_hf_llama import main as convert_main

    from megatron_infini.data.tokenizer import Tokenizer

    hf = _tiny_llama(tmp_path / "hf", rope_scaling=TINY_ROPE_SCALING, vocab=512)
    text = _llama3_style_tokenizer(tmp_path / "hf")
    ours_tok = Tokenizer(tmp_path / "hf")
    assert (ours_tok.kind, ours_tok.vocab_size, ours_tok.bos_id, ours_tok.eos_id) == ("huggingface", 400, 398, 399)
    ckpt = str(tmp_path / "ours")  # the command line of docs/evaluation.md, in this process
    assert convert_main(["--hf", str(tmp_path / "hf"), "--config", DEBUG_CONFIG, "--out", ckpt, "--tp", "2",
                         "model.memory_enabled=false", "model.segment_length=64"]) == 0
    assert Tokenizer(os.path.join(ckpt, "tokenizer")).fingerprint == ours_tok.fingerprint
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "to-hf", ckpt,
                        str(tmp_path / "export")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:]

    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "export", trust_remote_code=True)
    assert auto(text)["input_ids"] == ours_tok.encode(text, bos=True)
    assert auto.decode(ours_tok.encode(text)) == text
    # the export is an infini_llama directory (megatron_infini/hf): with memory off and one segment
    # as long as the input it computes what the original Llama computes
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True).eval()
    assert exported.config.eos_token_id == 399 and exported.config.llama3_rope_scaling["factor"] == 8.0
    assert len(transformers.AutoTokenizer.from_pretrained(tmp_path / "export", trust_remote_code=True)) == 400
    tokens = torch.tensor([ours_tok.encode(text, bos=True)[:48]])
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, hf(tokens).logits, atol=1e-5, rtol=1e-5)
