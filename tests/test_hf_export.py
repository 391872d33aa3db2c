"""Acceptance of `tools/convert_checkpoint.py to-hf` on trained checkpoints: the directory loads
with AutoConfig / AutoModelForCausalLM / AutoTokenizer (trust_remote_code=True) and gives
`megatron-infini eval perplexity`'s perplexity (held-out text several segments long, not a
multiple of the segment), `megatron-infini generate`'s 64 greedy tokens, each prompt's own
result in a left-padded batch of three, and a constant-size cache (memory test: slow)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from train_utils import REPO, run_cli, train

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

PROMPT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
          "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief, that thou her "
          "maid art far more fair than she. Be not her maid, since she is envious; her vestal livery is but sick "
          "and green, and none but fools do wear it; cast it off.")


def to_hf(ckpt, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "to-hf", str(ckpt),
                        str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:]
    return str(out)


def load(export):
    config = transformers.AutoConfig.from_pretrained(export, trust_remote_code=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    return config, model, tok


def held_out_text(tmp_path, tok, n_tokens):
    """A text file of the shipped held-out play cut to about `n_tokens` tokens."""
    from megatron_infini.data import CORPUS_DIR

    text = json.loads((CORPUS_DIR / "shakespeare_valid.jsonl").read_text().splitlines()[0])["text"]
    ids = tok(text, add_special_tokens=False)["input_ids"][:n_tokens]
    path = tmp_path / "held_out.txt"
    path.write_text(tok.decode(ids))
    return str(path)


def check_export(ckpt, tmp_path, segment_length):
    export = to_hf(ckpt, tmp_path / "export")
    config, model, tok = load(export)
    assert config.model_type == "infini_llama" and type(model).__name__ == "InfiniLlamaForCausalLM"
    assert config.max_position_embeddings >= 2 ** 20 and tok.model_max_length >= 2 ** 20
    assert config.segment_length == segment_length
    N = segment_length

    # perplexity: one forward over a held-out text of several segments, length not a multiple of N
    text = held_out_text(tmp_path, tok, 11 * N + 29)
    out = tmp_path / "ppl.json"
    run_cli("eval", "perplexity", "--checkpoint", ckpt, "--data", text, "--no-ablation", "--dtype", "fp32",
            "--json", str(out))
    ours = json.load(open(out))["overall"]["ppl_memory_on"]
    from megatron_infini.data.tokenizer import Tokenizer
    from megatron_infini.evaluation.perplexity import iter_token_documents

    (doc,) = iter_token_documents([text], Tokenizer(export), 1)
    assert len(doc) - 1 > 4 * N and (len(doc) - 1) % N
    ids = torch.tensor(doc)[None]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert abs(float(torch.exp(loss)) / ours - 1) < 1e-4, (float(torch.exp(loss)), ours)

    # 64 greedy tokens after a prompt longer than a segment = megatron-infini generate
    gen = tmp_path / "gen.json"
    run_cli("generate", "--checkpoint", ckpt, "--prompt", PROMPT, "--max-new-tokens", "64", "--dtype", "fp32",
            "--json", str(gen))
    want = json.load(open(gen))["ids"]
    prompt = tok(PROMPT, return_tensors="pt")
    assert prompt["input_ids"].shape[1] > N
    with torch.no_grad():
        got = model.generate(**prompt, max_new_tokens=64, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert got.tolist() == want

    # a left-padded batch of three prompts of different lengths: each prompt's own tokens
    prompts = [PROMPT, PROMPT[:40], PROMPT[:3 * len(PROMPT) // 4]]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=12, do_sample=False)[:, batch["input_ids"].shape[1]:]
        for i, p in enumerate(prompts):
            alone = tok(p, return_tensors="pt")
            one = model.generate(**alone, max_new_tokens=12, do_sample=False)[0, alone["input_ids"].shape[1]:]
            assert together[i, :len(one)].tolist() == one.tolist(), i
    return export


def test_debug_run_export(debug_run, tmp_path):
    """The debug config's run (tests/conftest.py): perplexity, generation, padded batch, round trip."""
    export = check_export(debug_run, tmp_path, 64)
    # from-hf reads the directory back (load_hf): written again, it is the same directory
    # (tests/test_checkpoint.py takes it on to our checkpoint format and compares the weights)
    from safetensors.torch import load_file

    from megatron_infini.checkpointing.convert import load_hf, save_hf

    save_hf(load_hf(export), str(tmp_path / "again"))
    for name in ("config.json", "generation_config.json", "modeling_infini_llama.py"):
        assert open(os.path.join(export, name)).read() == open(tmp_path / "again" / name).read(), name
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (export, tmp_path / "again"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("infini_gate") for k in a)


@pytest.mark.slow
def test_passkey_recipe_export(tmp_path):
    """The passkey recipe's model (configs/passkey_tiny.yaml: hard write gate, memory in layer 2
    only, segment 16), trained a few steps on the shipped corpus."""
    run = train(tmp_path / "run", "train.steps=6", "data.train_data=", "checkpoint.save_interval=6", nproc=0,
                config=os.path.join(REPO, "configs", "passkey_tiny.yaml"))
    assert run.returncode == 0, run.output[-3000:]
    check_export(run.run_dir, tmp_path, 16)
