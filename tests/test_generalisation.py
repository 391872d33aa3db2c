"""Passkey training data (mixed lengths, loss weights), the recipe command and its format file,
the needle-in-a-haystack eval, and (slow) the recipe's retrieval beyond its training length."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from train_utils import REPO, run_cli

#: The slow recipe test's bars at 4T and 16T, for the default SEED=0 (docs/generalisation.md,
#: round 5): the recipe (3000 steps, memory in the top layer, the repeat augmentation from step
#: 1000) retrieved 80-100% at 4T and at 16T over training seeds 0-4 (100 prompts a length; memory
#: off <= 2%; seed 0: 100% at both), while a run that never leaves the loss plateau scores 0-7%.
#: 50% and 60% separate the two with a wide margin (binomial deviation at 80% with 50 prompts: 6 points).
RECIPE_4T_THRESHOLD = 0.5
RECIPE_16T_THRESHOLD = 0.6


@pytest.fixture(scope="module")
def tok():
    from megatron_infini.data import SHAKESPEARE_TOKENIZER
    from megatron_infini.data.tokenizer import Tokenizer

    return Tokenizer(SHAKESPEARE_TOKENIZER)


def test_mixed_length_documents_and_answer_weights(tok, tmp_path):
    from megatron_infini.data.dataset import PackedDocumentDataset
    from megatron_infini.evaluation.finetune_data import write_passkey_data
    from megatron_infini.evaluation.passkey_data import QUESTION, parse_key

    prefix = str(tmp_path / "train")
    write_passkey_data(prefix, tok, 128, 40, min_length=48, key_digits=2, intro=False, answer_weight=20, seed=5)
    docs = [json.loads(line) for line in open(prefix + ".jsonl")]
    ds = PackedDocumentDataset(prefix, 128, shuffle=False)
    ws = PackedDocumentDataset(prefix + "_weights", 128, shuffle=False)
    assert (ds.doc_lengths == 128).all() and np.array_equal(ds.doc_lengths, ws.doc_lengths)
    assert min(d["length"] for d in docs) < 90 < max(d["length"] for d in docs)  # lengths do vary
    for i, doc in enumerate(docs):
        x, w = ds.document(i), ws.document(i)
        n = doc["length"]
        assert (x[n - 1:] == tok.eos_id).all() and x[n - 2] != tok.eos_id  # answer + EOS, then EOS padding
        text = tok.decode(x[:n].tolist())
        assert parse_key(text.split(QUESTION.strip())[1]) == doc["key"] and 10 <= doc["key"] <= 99
        answer = len(tok.encode(f" {doc['key']}.")) + 1  # with its EOS
        assert (w[:n - answer] == 1).all() and (w[n - answer:n] == 20).all() and (w[n:] == 0).all()
    with pytest.raises(ValueError, match="min_length"):
        write_passkey_data(str(tmp_path / "bad"), tok, 128, 2, min_length=200)


def test_recipe_lengths_in_multiples_of_the_training_length(tmp_path):
    from megatron_infini.evaluation.recipe import find_recipe, parse_lengths, write_recipe

    assert parse_lengths("T,4T,1k,300", 128) == [128, 512, 1024, 300]
    with pytest.raises(ValueError, match="recipe"):
        parse_lengths("4T", None)
    write_recipe(str(tmp_path), 128, 2, intro=False)
    os.makedirs(tmp_path / "checkpoints" / "iter_0000003")
    for where in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "iter_0000003"):
        assert find_recipe(str(where)) == {"train_length": 128, "key_digits": 2, "intro": False}
    os.makedirs(tmp_path / "other" / "checkpoints")  # another run inside this one: no recipe of its own
    assert find_recipe(str(tmp_path / "other" / "checkpoints")) is None


def test_recipe_command_trains_and_eval_reads_its_format(tmp_path):
    """tools/passkey_tiny.sh for 3 steps: data, weighted training, recipe file; eval passkey then
    evaluates in the recorded format with lengths in multiples of T."""
    run = tmp_path / "pk"
    env = dict(os.environ, STEPS="3", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "passkey_tiny.sh"), str(run)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert json.loads((run / "passkey_recipe.json").read_text()) == {"train_length": 128, "key_digits": 2,
                                                                     "intro": False}
    steps = [json.loads(line) for line in open(run / "metrics.jsonl") if '"loss"' in line]
    assert [r["step"] for r in steps] == [1, 2, 3]
    out = tmp_path / "pk.json"
    run_cli("eval", "passkey", "--checkpoint", str(run), "--lengths", "T,4T", "--depths", "0,1", "--samples", "2",
            "--json", str(out))
    res = json.loads(out.read_text())
    assert set(res["results"]["on"]["table"]) == {"128", "512"}
    assert res["key_digits"] == 2 and res["intro"] is False
    assert all(9 < k < 100 for c in res["results"]["on"]["cells"] for k in c["keys"])  # 2-digit keys


def test_needle_prompts(tok):
    from megatron_infini.evaluation.needle import NeedleBuilder, haystack_ids
    from megatron_infini.evaluation.passkey_data import NEEDLE, QUESTION, parse_key

    hay = haystack_ids(tok)
    assert len(hay) > 30000
    import random

    b = NeedleBuilder(tok, hay, needles=3, intro=True)
    rng = random.Random(0)
    for length, depth in ((400, 0.0), (1000, 0.5), (3000, 1.0)):
        s = b.build(length, depth, rng, key_digits=3)
        assert len(s.ids) == length
        text = tok.decode(s.ids)
        asked = tok.decode(s.ids[s.needle_start:s.needle_end])
        name = asked.split()[1]
        assert parse_key(asked) == s.key and f"What is the {name} pass key?" in text
        assert text.count("pass key is") == 3 + 1  # three needles and the question
        keys = {parse_key(part) for part in text.split(" pass key is ")[1:]}  # the question ends the text
        assert len(keys) == 3 and s.key in keys
    one = NeedleBuilder(tok, hay, needles=1, intro=False).build(500, 0.5, rng)
    assert tok.decode(one.ids[one.needle_start:one.needle_end]).strip() == NEEDLE.format(key=one.key).strip()
    assert tok.decode(one.ids).endswith(QUESTION.strip())
    with pytest.raises(ValueError, match="needles"):
        NeedleBuilder(tok, hay, needles=0)


def test_needle_eval_end_to_end(debug_run, tmp_path):
    out = tmp_path / "needle.json"
    text = run_cli("eval", "needle", "--checkpoint", debug_run, "--lengths", "300,700", "--depths", "0,1",
                   "--needles", "2", "--samples", "2", "--no-memory", "--json", str(out))
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"on", "off"} and res["needles"] == 2
    assert set(res["results"]["on"]["table"]) == {"300", "700"}
    assert set(res["results"]["off"]["table"]["300"]) == {"0", "1"}
    cell = res["results"]["on"]["cells"][0]
    assert {"length", "depth", "accuracy", "samples", "keys", "answers", "seconds"} <= set(cell)
    assert "needle accuracy (2 keys), memory off" in text
    proc = subprocess.run([sys.executable, "-m", "megatron_infini.cli", "eval", "needle", "--checkpoint", debug_run,
                           "--needles", "9"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 2 and "--needles" in proc.stdout


def _check_write_gate(rank, world_size):
    import torch
    from _dist import TOL
    from test_megatron_layer import build, data, logits
    from torch.testing import assert_close

    from megatron_infini.streaming import infini_cores, reset_memory, set_memory_carry

    ids, _ = data()
    for update, gate, w0 in (("linear", "hard", 0.1), ("delta", "sigmoid", 0.5)):
        ref = logits(build(memory_update=update), ids)
        model = build(memory_update=update, memory_write_gate=gate, memory_write_init=w0)
        assert_close(logits(model, ids), ref, **TOL)  # u = 0: a constant strength, the paper's output
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("write_weight", "write_bias")):
                    p.copy_(torch.randn(p.shape, generator=g) * 2)
        whole = logits(model, ids)
        assert not torch.allclose(whole, ref, **TOL), "write strengths had no effect"
        set_memory_carry(model, True)  # streaming with write strengths equals one call
        assert_close(torch.cat([logits(model, ids[:, :16]), logits(model, ids[:, 16:])], dim=1), whole, **TOL)
        keys = set(model.sharded_state_dict())
        assert any(k.endswith("core_attention.write_weight") for k in keys)

    model = build(memory_write_gate="hard")  # a token pushed below 0 is not stored at all
    with torch.no_grad():
        for core in infini_cores(model):
            core.write_bias.fill_(-1.0)
    set_memory_carry(model, True)
    reset_memory(model)
    logits(model, ids)
    assert all(float(core.memory[0].abs().max()) == 0.0 and float(core.memory[1].abs().max()) == 0.0
               for core in infini_cores(model))
    return True


def _check_memory_layers(rank, world_size):
    import torch
    from _dist import TOL
    from test_megatron_layer import build, data, logits
    from torch.testing import assert_close

    from megatron_infini.streaming import infini_cores, set_memory_carry

    ids, _ = data()
    model = build(memory_layers=(2,), memory_write_gate="hard", memory_write_init=0.1)
    cores = list(infini_cores(model))
    assert cores[0].gate is None and cores[0].write_weight is None  # layer 1: local attention only
    assert cores[1].gate is not None and cores[1].write_weight is not None
    # Reference: the paper's model (same seed, same weights) with layer 1's memory gated out exactly
    ref_model = build()
    with torch.no_grad():
        next(iter(infini_cores(ref_model))).gate.fill_(-200.0)  # sigmoid = 0: A = A_local
    ref = logits(ref_model, ids)
    assert_close(logits(model, ids), ref, **TOL)
    assert not torch.allclose(logits(build(), ids), ref, **TOL), "layer 1's memory had no effect"
    set_memory_carry(model, True)  # streaming: only layer 2 carries a memory
    assert_close(torch.cat([logits(model, ids[:, :16]), logits(model, ids[:, 16:])], dim=1), ref, **TOL)
    assert cores[0].memory is None and cores[1].memory is not None
    # Megatron's dist_checkpointing round trip: the gate exists in layer 2 only (stacked over
    # the memory layers, not over all layers)
    import tempfile

    from megatron.core import dist_checkpointing

    with tempfile.TemporaryDirectory() as d:
        dist_checkpointing.save(model.sharded_state_dict(), d)
        other = build(seed=5, memory_layers=(2,), memory_write_gate="hard", memory_write_init=0.1)
        with torch.no_grad():
            list(infini_cores(other))[1].gate.fill_(3.0)
        other.load_state_dict(dist_checkpointing.load(other.sharded_state_dict(), d))
    for (name, p), (name2, p2) in zip(model.state_dict().items(), other.state_dict().items()):
        if p is not None and torch.is_tensor(p):
            assert name == name2 and torch.equal(p, p2), name
    for bad in ((3,), (), (2, 2), (0,), "2"):
        with pytest.raises(ValueError, match="memory_layers"):
            build(memory_layers=bad)
    return True


def _check_write_penalty(rank, world_size):
    import torch
    from test_megatron_layer import build, data

    from megatron_infini.layers.attention import write_penalty
    from megatron_infini.streaming import infini_cores

    ids, _ = data()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    lam, w0 = 0.05, 0.2
    for layers in (None, (2,)):
        model = build(memory_write_gate="hard", memory_write_init=w0, memory_write_l1=lam, memory_layers=layers)
        model.train()
        model(ids, pos, None)
        pen = write_penalty(model)
        n = 2 if layers is None else 1
        assert abs(pen.item() - lam * w0 * n) < 1e-6, pen  # u = 0: every strength is w0
        assert write_penalty(model) is None  # cleared on read: never added twice
        pen.backward()
        for core in infini_cores(model):
            if core.write_bias is not None:  # d mean(w) / d c_g = 1 / groups (no token clamped)
                torch.testing.assert_close(core.write_bias.grad, torch.full_like(core.write_bias, lam / 2))
        with torch.no_grad():  # every strength clamped to exactly 0: no penalty left, no gradient
            for core in infini_cores(model):
                if core.write_bias is not None:
                    core.write_bias.fill_(-1.0)
                    core.write_bias.grad = None
        model(ids, pos, None)
        pen = write_penalty(model)
        assert pen.item() == 0.0
        pen.backward()
        assert all(c.write_bias.grad is None or not c.write_bias.grad.any() for c in infini_cores(model)
                   if c.write_bias is not None)
        model.eval()
        with torch.no_grad():
            model(ids, pos, None)
        assert write_penalty(model) is None  # training only
    for bad, msg in (({"memory_write_l1": 0.1}, "needs learned write strengths"),
                     ({"memory_write_gate": "hard", "memory_write_l1": -1.0}, "finite number >= 0")):
        with pytest.raises(ValueError, match=msg):
            build(**bad)
    return True


def test_write_penalty_is_the_mean_strength_and_stops_at_zero():
    """model.memory_write_l1: lambda * mean write strength per memory layer, in training only."""
    from _dist import run_distributed

    assert run_distributed(_check_write_penalty, 1) == [True]


def test_trainer_adds_the_write_penalty_from_its_start_step(tmp_path):
    """memory_write_l1_start: the trainer adds the penalty from that step on. A large penalty
    from step 1 (the second update) leaves steps 1-2 as without it and changes step 3."""
    from train_utils import train

    base = ["train.steps=3", "model.memory_write_gate=hard", "model.memory_write_l1=10"]
    late = train(tmp_path / "late", *base, "model.memory_write_l1_start=100", nproc=0)
    early = train(tmp_path / "early", *base, "model.memory_write_l1_start=1", nproc=0)
    assert late.returncode == 0 and early.returncode == 0, (late.output[-2000:], early.output[-2000:])
    assert early.losses[:2] == late.losses[:2]
    assert early.losses[2] != late.losses[2]


def test_write_gate_layer_starts_as_the_paper_and_streams():
    from _dist import run_distributed

    assert run_distributed(_check_write_gate, 1) == [True]


def test_memory_in_chosen_layers_only():
    """model.memory_layers: the other layers are the paper's layer with its memory gated out."""
    from _dist import run_distributed

    assert run_distributed(_check_memory_layers, 1) == [True]


@pytest.mark.slow
def test_recipe_retrieves_beyond_its_training_length(tmp_path):
    """The full recipe (tools/passkey_tiny.sh, ~7 min on 2 idle cores): at 4T and 16T the key
    is retrieved with memory, far above chance, and not without (RECIPE_*_THRESHOLD)."""
    run = tmp_path / "pk"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "passkey_tiny.sh"), str(run)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = tmp_path / "pk.json"
    run_cli("eval", "passkey", "--checkpoint", str(run), "--lengths", "4T,16T", "--depths", "0,0.25,0.5,0.75,1",
            "--samples", "10", "--seed", "3", "--no-memory", "--json", str(out), timeout=900)
    res = json.loads(out.read_text())["results"]
    for mult, bar in ((4, RECIPE_4T_THRESHOLD), (16, RECIPE_16T_THRESHOLD)):
        on, off = (sum(c["accuracy"] for c in res[m]["cells"] if c["length"] == mult * 128)
                   / sum(c["length"] == mult * 128 for c in res[m]["cells"]) for m in ("on", "off"))
        assert on >= bar and off <= 0.1, (mult, on, off)


def test_generalisation_tool_table_plateau_and_heads(debug_run, tmp_path):
    """tools/generalisation.py: the plateau column, the table of finished runs, the per-head shares."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import generalisation as g
    finally:
        sys.path.pop(0)
    metrics = tmp_path / "metrics.jsonl"
    losses = [0.6] * 60 + [0.1] * 60  # last 50 with k of 0.1: mean 0.6 - 0.01 k < 0.45 from k = 16
    metrics.write_text("".join(json.dumps({"step": i + 1, "loss": x}) + "\n" for i, x in enumerate(losses)))
    assert g.plateau_exit(str(metrics)) == "76"
    metrics.write_text("".join(json.dumps({"step": i + 1, "loss": 0.6}) + "\n" for i in range(100)))
    assert g.plateau_exit(str(metrics)) == "not left"
    assert g.plateau_exit(str(tmp_path / "missing.jsonl")) == "?"
    out = tmp_path / "gen"
    (out / "v-s0").mkdir(parents=True)
    (out / "v-s0" / "metrics.jsonl").write_text(metrics.read_text())
    acc = {"on": {"128": [1.0, 0.5], "2048": [0.25]}, "off": {"128": [0.0], "2048": [0.0]}}
    result = {"variant": "v", "seed": 0, "steps": 100, "mults": [1, 16], "train_s": 12.0,
              "eval": {"accuracy": acc, "share": {"128": [0.5, 1.0], "2048": [0.05, 1.0]}, "gate": [[0.5], [0.7]]}}
    (out / "v-s0" / "result.json").write_text(json.dumps(result))
    row = g.table(str(out)).splitlines()[-1]
    assert row == "| v | 100 | 0 | 75% | 25% | 0% | 0% | 0.50 / 1.00 -> 0.050 / 1.000 | 0.50; 0.70 | not left | 12 |"
    import torch

    threads = torch.get_num_threads()
    try:
        text = g.head_shares(debug_run, 2, [1])
    finally:
        torch.set_num_threads(threads)  # head_shares sets 1 for itself
    lines = text.splitlines()
    assert lines[1].startswith("  1T: ") and len(lines[1].split(";")) == 2  # two layers
    assert all(0.0 <= float(v) <= 1.0 for layer in lines[1][6:].split(";") for v in layer.split(","))

    try:  # one row per saved checkpoint, oldest first; the newest agrees with `eval passkey` on it
        rows = g.trajectory(debug_run, 2, [5], 2, [1]).splitlines()[2:]
    finally:
        torch.set_num_threads(threads)
    assert [r.split("|")[1].strip() for r in rows] == ["20", "40"], rows
    out = tmp_path / "pk.json"
    run_cli("eval", "passkey", "--checkpoint", os.path.join(debug_run, "checkpoints", "iter_0000040"), "--lengths",
            "128", "--depths", "0,0.25,0.5,0.75,1", "--samples", "2", "--seed", "5", "--key-digits", "2",
            "--no-intro", "--json", str(out))
    cells = json.loads(out.read_text())["results"]["on"]["cells"]
    assert rows[-1] == f"| 40 | {sum(c['accuracy'] for c in cells) / len(cells):.0%} |"
