"""megatron_infini/hf: the exported modeling file (trust_remote_code) against our Megatron model.

Random models of every exportable kind (linear / delta, write gates hard / sigmoid, memory in
chosen layers, memory off, GQA, Llama 3 RoPE scaling, tied embeddings) are built with our
trainer's `build_model` in a spawned process; their weights go through `megatron_to_hf` into the
modeling file's model, which must give the same logits on inputs of any length (not a multiple
of the segment), also token by token through its constant-size cache, in batches padded left
or right, and the same greedy generations. Options the file cannot express are refused."""

import os
import sys

import pytest
import torch

from _dist import run_distributed

transformers = pytest.importorskip("transformers")

N = 16
VOCAB = 128

KINDS = {  # model.* overrides of each kind
    "linear-gqa": dict(memory_update="linear", num_query_groups=2),
    "delta-hard-write-top-layer-llama3": dict(memory_update="delta", memory_write_gate="hard", memory_layers=[2],
                                              memory_write_init=0.3, rope_scaling=True, rope_scaling_factor=4.0,
                                              rope_scaling_original_max_position=8),
    "sigmoid-write-tied": dict(memory_write_gate="sigmoid", untie_embeddings=False, num_query_groups=4),
    "memory-off": dict(memory_enabled=False),
}


def _config(kind):
    from megatron_infini.training.config import Config

    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = 2, 64, 4, 2
    m.segment_length = N
    for k, v in KINDS[kind].items():
        setattr(m, k, v)
    cfg.train.seq_length = 4 * N
    return cfg


def _megatron_references(rank, world_size, tokens):
    """`_megatron_reference` of every kind, in one spawned process."""
    return {kind: _megatron_reference(kind, tokens) for kind in KINDS}


def _megatron_reference(kind, tokens):
    """Our model with perturbed gates / write parameters / norms: its TP=1 state dict, config and
    the logits of one forward call over `tokens` [b, s] (the streaming evaluation's logits)."""
    from megatron_infini.training.config import to_dict
    from megatron_infini.training.model import build_model

    torch.manual_seed(0)
    cfg = _config(kind)
    model = build_model(cfg, VOCAB).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layernorm" in n or n.endswith(".gate") or "write_" in n:
                p.add_(torch.randn_like(p) * (0.3 if "write_weight" in n else 0.5))
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        logits = model(tokens, pos, None).float()  # [b, s, V]
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return sd, to_dict(cfg), logits


def hf_model(sd, cfg):
    """The modeling file's model holding our weights (what a to-hf directory loads)."""
    from megatron_infini.checkpointing.convert import megatron_to_hf
    from megatron_infini.hf.configuration_infini_llama import InfiniLlamaConfig
    from megatron_infini.hf.export import infini_llama_config
    from megatron_infini.hf.modeling_infini_llama import InfiniLlamaForCausalLM

    hc = infini_llama_config(cfg, VOCAB)
    config = InfiniLlamaConfig(**{k: v for k, v in hc.items() if k not in ("architectures", "auto_map", "model_type")})
    model = InfiniLlamaForCausalLM(config).eval()
    state = megatron_to_hf(sd, cfg["model"])
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


TOKENS = torch.randint(0, VOCAB, (2, 5 * N + 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def references():
    (refs,) = run_distributed(_megatron_references, 1, TOKENS, tp=1)
    return refs


@pytest.fixture(params=list(KINDS))
def pair(request, references):
    sd, cfg, ref = references[request.param]
    return request.param, hf_model(sd, cfg), TOKENS, ref


def test_forward_equals_our_model_at_any_length(pair):
    kind, model, tokens, ref = pair
    with torch.no_grad():
        out = model(tokens, labels=tokens)
    torch.testing.assert_close(out.logits, ref, atol=2e-5, rtol=1e-4)
    want = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=1e-5)
    if "write" in kind or kind == "linear-gqa":  # the memory matters: an empty memory changes the logits
        far = model(tokens[:, 2 * N:]).logits
        assert (far[:, N:] - ref[:, 3 * N:]).abs().max() > 1e-3


def test_cache_token_by_token_and_in_chunks(pair):
    """The cache holds the memory and < N pending keys/values; any split of the input into calls
    gives the one-call logits."""
    _, model, tokens, ref = pair
    with torch.no_grad():
        for sizes in ([1] * tokens.shape[1], [N - 3, 1, 2 * N + 5, N, 1, tokens.shape[1]]):
            cache, outs, start = None, [], 0
            for size in sizes:
                piece = tokens[:, start:start + size]
                if not piece.shape[1]:
                    break
                out = model(piece, cache=cache, use_cache=True)
                cache, start = out.cache, start + piece.shape[1]
                outs.append(out.logits)
                assert int(cache.pending.max()) < N
                assert all(st["k"].shape[1] < N for st in cache.states.values())
            torch.testing.assert_close(torch.cat(outs, dim=1), ref, atol=2e-5, rtol=1e-4)


def test_padded_batches_give_each_row_its_own_result(pair):
    """Rows of different lengths, left-padded (generation) and right-padded (scoring)."""
    _, model, tokens, _ = pair
    lengths = [3 * N + 5, N - 2, 2 * N]
    rows = [tokens[i % 2, :n] for i, n in enumerate(lengths)]
    with torch.no_grad():
        single = [model(r[None]).logits[0] for r in rows]
        S = max(lengths)
        for side in ("left", "right"):
            ids = torch.zeros(3, S, dtype=torch.long)
            mask = torch.zeros(3, S, dtype=torch.long)
            for i, r in enumerate(rows):
                cols = slice(S - len(r), S) if side == "left" else slice(0, len(r))
                ids[i, cols], mask[i, cols] = r, 1
            out = model(ids, attention_mask=mask).logits
            for i, r in enumerate(rows):
                cols = slice(S - len(r), S) if side == "left" else slice(0, len(r))
                torch.testing.assert_close(out[i, cols], single[i], atol=2e-5, rtol=1e-4)
        # left-padded greedy generation: each row as alone
        ids = torch.zeros(3, S, dtype=torch.long)
        mask = torch.zeros(3, S, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, S - len(r):], mask[i, S - len(r):] = r, 1
        gen = dict(max_new_tokens=N + 3, do_sample=False, pad_token_id=0, eos_token_id=None)
        batch = model.generate(ids, attention_mask=mask, **gen)[:, S:]
        for i, r in enumerate(rows):
            alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), **gen)
            assert batch[i].tolist() == alone[0, len(r):].tolist()


def test_generate_equals_greedy_over_full_forwards(pair):
    """generate() with the constant-size cache = argmax of a full forward at every step."""
    _, model, tokens, _ = pair
    prompt = tokens[:1, :2 * N + 3]
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=N + 5, do_sample=False, pad_token_id=0, eos_token_id=None)
        seq = prompt
        for _ in range(N + 5):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got.tolist() == seq.tolist()


@pytest.mark.parametrize("key,value", [("memory_type", "compressive"), ("memory_type", "xl"),
                                       ("memory_free_attention", "xl"), ("normalization", "LayerNorm"),
                                       ("activation", "gelu")])
def test_export_refuses_what_it_cannot_express(key, value):
    from megatron_infini.hf.export import infini_llama_config
    from megatron_infini.training.config import Config, to_dict

    cfg = to_dict(Config())
    cfg["model"][key] = value
    with pytest.raises(ValueError, match=f"model.{key}={value!r} cannot be exported"):
        infini_llama_config(cfg, VOCAB)


@pytest.mark.parametrize("kind", list(KINDS))
def test_config_fields_round_trip(kind):
    """A directory without our full config (megatron_infini_config) is read from its own fields."""
    from megatron_infini.hf.export import infini_llama_config, model_fields
    from megatron_infini.training.config import to_dict

    cfg = to_dict(_config(kind))
    hc = infini_llama_config(cfg, VOCAB)
    again = infini_llama_config({**cfg, "model": {**cfg["model"], **model_fields(hc)}}, VOCAB)
    drop = lambda d: {k: v for k, v in d.items() if k != "megatron_infini_config"}  # noqa: E731
    assert drop(again) == drop(hc)


def test_modeling_files_stand_alone():
    """The copied files import nothing of ours (torch and transformers only), and the advertised
    length matches."""
    from megatron_infini.hf import configuration_infini_llama, export

    for name in export.MODEL_FILES:
        src = open(os.path.join(export.HERE, name)).read()
        assert "megatron" not in src.replace("megatron-infini", "").lower(), name
        assert len(src.splitlines()) <= 500
    assert export.UNBOUNDED_LENGTH == configuration_infini_llama.UNBOUNDED_LENGTH


def test_cache_size_is_constant_during_generation(pair):
    """After every whole segment the cache holds the same numbers: the memory, plus the keys and
    values of < N pending tokens."""
    kind, model, tokens, _ = pair
    cfg = model.config
    sizes = {}
    with torch.no_grad():
        out = model(tokens[:1, :N + 1], use_cache=True)  # pending: 1 token
        cache = out.cache
        for step in range(4 * N):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, cache=cache, use_cache=True)
            sizes.setdefault(int(cache.pending[0]), set()).add(cache.numel())
    assert all(len(s) == 1 for s in sizes.values()), sizes  # same pending length, same size
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * cfg.num_hidden_layers
    memory_layers = sum(cfg.layer_has_memory(i) for i in range(cfg.num_hidden_layers))
    memory = memory_layers * cfg.num_key_value_heads * cfg.head_dim * (cfg.head_dim + 1)
    assert max(max(s) for s in sizes.values()) == memory + (N - 1) * per_token


MEMORY_SCRIPT = """
import resource, torch
from megatron_infini.hf.configuration_infini_llama import InfiniLlamaConfig
from megatron_infini.hf.modeling_infini_llama import InfiniLlamaForCausalLM
torch.manual_seed(0)
cfg = InfiniLlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, segment_length=64)
model = InfiniLlamaForCausalLM(cfg).eval()
n, chunk = {n}, 4096
ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    cache = None
    for start in range(0, n - 1, chunk):  # the prompt but its last token through forward in chunks
        cache = model(ids[:, start:min(start + chunk, n - 1)], cache=cache, use_cache=True, logits_to_keep=1).cache
    # generate() reads the last prompt token, then generates
    out = model.generate(ids, cache=cache, max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)
assert out.shape[1] == n + 32
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, cache.numel())
"""


@pytest.mark.slow
def test_generate_peak_memory_does_not_grow_with_the_prompt():
    """Peak resident memory of a process that reads a 64K-token prompt (in 4K chunks) and then
    generates is within 5% of the one that reads 8K tokens; the caches hold the same numbers."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = {}
    for n in (8192, 65536):
        p = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT.format(n=n)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:]
        res[n] = [int(x) for x in p.stdout.split()[-2:]]
    assert res[8192][1] == res[65536][1]
    assert res[65536][0] <= 1.05 * res[8192][0], res
