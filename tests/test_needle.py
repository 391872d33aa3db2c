"""The hardened retrieval protocol (prompts of any token length, needles at random in-segment
offsets, numbers in the haystack, the distractor rate, the query that reads the key) and the
natural-text needle recipe (training documents, tools/needle_tiny.sh; slow: its retrieval)."""

import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from train_utils import REPO, run_cli

#: The slow recipe test's bar at 16T (tools/needle_tiny.sh, seed 0, `eval needle` with 2 needles
#: and haystack numbers, evaluation seed 3): the acceptance's bar for every training seed. Not a
#: measured figure: no run of the recipe has retrieved yet (docs/generalisation.md, "Natural
#: text": 0-2% in the runs measured), so this test fails until the recipe works.
NEEDLE_RECIPE_16T_THRESHOLD = 0.6


@pytest.fixture(scope="module")
def tok():
    from megatron_infini.data import SHAKESPEARE_TOKENIZER
    from megatron_infini.data.tokenizer import Tokenizer

    return Tokenizer(SHAKESPEARE_TOKENIZER)


@pytest.fixture(scope="module")
def play(tok):
    from megatron_infini.evaluation.needle_data import haystack_ids

    return haystack_ids(tok)


def _numbers_outside_needles(text: str) -> list:
    text = re.sub(r"The (\w+ )?pass key is \d+\. Remember it\. \d+ is the (\w+ )?pass key\.", "", text)
    return re.findall(r"\d+", text)


def test_prompts_have_exactly_the_requested_length(tok, play):
    """Any length in tokens, with and without haystack numbers and random offsets."""
    from megatron_infini.evaluation.needle_data import NeedleBuilder
    from megatron_infini.evaluation.passkey import make_samples
    from megatron_infini.evaluation.passkey_data import PasskeyBuilder, parse_key

    pk = PasskeyBuilder(tok, intro=False)
    nb = NeedleBuilder(tok, play, needles=3, intro=False, numbers=4.0, segment_length=16)
    rng = random.Random(0)
    for length in (301, 1000, 2085, 4100):
        for s in make_samples(pk, length, 0.5, 2, 1, 2, segment_length=16, numbers=4.0):
            assert len(s.ids) == length and parse_key(tok.decode(s.ids[s.needle_start:s.needle_end])) == s.key
            numbers = _numbers_outside_needles(tok.decode(s.ids))
            assert len(numbers) >= length // 100 and all(len(n) == 2 and int(n) != s.key for n in numbers)
        s = nb.build(length, 0.25, rng, key_digits=2)
        text = tok.decode(s.ids)
        assert len(s.ids) == length and parse_key(tok.decode(s.ids[s.needle_start:s.needle_end])) == s.key
        assert len(s.distractors) == 2 and s.key not in s.distractors
        assert {int(k) for k in re.findall(r"pass key is (\d+)", text)} == {s.key, *s.distractors}
        assert all(int(n) not in (s.key, *s.distractors) for n in _numbers_outside_needles(text))
    plain = make_samples(pk, 1000, 0.5, 2, 1, 2)  # the old protocol: no numbers, the needle exactly at its depth
    assert all(_numbers_outside_needles(tok.decode(s.ids)) == [] for s in plain)
    assert len({s.needle_start for s in plain}) == 1


def test_needle_offsets_vary_with_the_seed_inside_the_depths_segment(tok, play):
    from megatron_infini.evaluation.needle_data import NeedleBuilder
    from megatron_infini.evaluation.passkey import make_samples
    from megatron_infini.evaluation.passkey_data import PasskeyBuilder

    pk = PasskeyBuilder(tok, intro=False)
    fixed = make_samples(pk, 2048, 0.5, 1, 0, 2)[0]
    offsets = set()
    for seed in range(12):
        a, b = make_samples(pk, 2048, 0.5, 2, seed, 2, segment_length=16)
        assert a.needle_start // 16 == fixed.needle_start // 16  # same segment as the depth says
        assert a.key == make_samples(pk, 2048, 0.5, 2, seed, 2)[0].key  # the keys do not depend on the offsets
        offsets |= {a.needle_start % 16, b.needle_start % 16}
    assert len(offsets) >= 8, offsets
    assert make_samples(pk, 2048, 0.5, 3, 4, 2, segment_length=16)[0].ids == \
        make_samples(pk, 2048, 0.5, 3, 4, 2, segment_length=16)[0].ids  # seeded
    nb = NeedleBuilder(tok, play, needles=2, intro=False, segment_length=16)
    starts = {nb.build(2048, 0.5, random.Random(seed), 2).needle_start % 16 for seed in range(12)}
    assert len(starts) >= 6, starts


def test_distractor_rate_counts_other_needles_keys():
    from megatron_infini.evaluation.passkey import cell_scores
    from megatron_infini.evaluation.passkey_data import PasskeySample

    def sample(key, distractors):
        return PasskeySample([1], key, 0, 1, 1, [], distractors=distractors)

    group = [sample(11, [22, 33]), sample(44, [55]), sample(66, [77]), sample(88, []), sample(12, [21])]
    preds = [33, 44, 66, 22, None]  # another needle's key; right; right; a number no needle has; no answer
    assert cell_scores(preds, group) == (2 / 5, 1 / 5)
    assert cell_scores([22, 55, 77, 88, 21], group) == (1 / 5, 4 / 5)


def test_lengths_as_tokens_or_multiples_with_an_offset(tmp_path):
    from megatron_infini.evaluation.recipe import find_recipe, parse_lengths, write_recipe

    assert parse_lengths("1000,4100,16T+37,64T-5,T,2k", 128) == [1000, 4100, 2085, 8187, 128, 2048]
    for bad in ("16T*3", "xT", "T-200"):
        with pytest.raises(ValueError):
            parse_lengths(bad, 128)
    write_recipe(str(tmp_path), 128, 2, intro=False, file="needle_recipe.json", needles=2)
    assert find_recipe(str(tmp_path / "checkpoints")) == {"train_length": 128, "key_digits": 2, "intro": False,
                                                          "needles": 2}


def test_retrieval_share_is_read_by_the_query_of_the_first_key_digit(debug_run, tok):
    """A prompt of a multiple of the segment length: the first digit is predicted at the answer's
    leading space, in a new segment, whose memory holds the whole prompt: a needle in the
    prompt's last segment has a share there, and none in the memory of the prompt's last token."""
    from megatron_infini.evaluation.passkey_data import PasskeyBuilder
    from megatron_infini.evaluation.retrieval_stats import needle_share, reading_position
    from megatron_infini.inference.loader import inference_session, load_model_for_inference

    with inference_session():
        model, cfg, _ = load_model_for_inference(debug_run)
        N = cfg.model.segment_length
        s = PasskeyBuilder(tok, intro=False).build(4 * N, 1.0, 42)  # the needle ends the last prompt segment
        ids, pos = reading_position(s, tok)
        assert pos == len(s.ids) and tok.decode([ids[-1]]) == " " and tok.decode([s.answer_ids[1]]) == "4"
        fixed, old = needle_share(model, s, tok), needle_share(model, s)
    assert (fixed["position"], fixed["stored"]) == (4 * N, 4 * N)
    assert (old["position"], old["stored"]) == (4 * N - 1, 3 * N)
    assert all(v > 0 for layer in fixed["share"] for v in layer)
    assert all(v == 0 for layer in old["share"] for v in layer)


def test_needle_training_documents(tok, tmp_path):
    from megatron_infini.data.dataset import PackedDocumentDataset
    from megatron_infini.evaluation.needle_data import NAMED_NEEDLE, training_haystack_path, write_needle_data
    from megatron_infini.evaluation.passkey_data import parse_key

    assert training_haystack_path().endswith("shakespeare_train.jsonl")
    prefix = str(tmp_path / "train")
    write_needle_data(prefix, tok, 128, 60, needles=2, min_length=80, key_digits=2, numbers=3.0, seed=4)
    docs = [json.loads(line) for line in open(prefix + ".jsonl")]
    ds = PackedDocumentDataset(prefix, 128, shuffle=False)
    ws = PackedDocumentDataset(prefix + "_weights", 128, shuffle=False)
    assert (ds.doc_lengths == 128).all() and np.array_equal(ds.doc_lengths, ws.doc_lengths)
    assert min(d["length"] for d in docs) < 100 < max(d["length"] for d in docs)
    numbers = 0
    for i, doc in enumerate(docs):
        x, w, n = ds.document(i), ws.document(i), doc["length"]
        assert (x[n - 1:] == tok.eos_id).all() and x[n - 2] != tok.eos_id
        text = tok.decode(x[:n].tolist())
        keys = [int(k) for k in re.findall(r"pass key is (\d+)\. Remember", text)]
        assert sorted(keys) == sorted([doc["key"], *doc["distractors"]]) and len(set(keys)) == 2
        name = re.search(r"What is the (\w+) pass key\?", text).group(1)
        assert parse_key(text.split(f"The {name} pass key is ")[1]) == doc["key"]
        assert parse_key(text.split("What is the")[1].split("pass key is")[1]) == doc["key"]
        answer = len(tok.encode(f" {doc['key']}.")) + 1
        assert (w[:n - answer] == 1).all() and (w[n - answer:n] == 20).all() and (w[n:] == 0).all()
        numbers += len(_numbers_outside_needles(text.split(" What is the")[0]))
    assert numbers >= 30  # about 3 per 100 haystack tokens
    with pytest.raises(ValueError, match="min_length"):
        write_needle_data(str(tmp_path / "bad"), tok, 128, 2, needles=2, min_length=40)
    # --needle-weight: every needle's tokens (the asked one and the distractor), found by their text
    write_needle_data(prefix + "_nw", tok, 128, 20, needles=2, min_length=80, key_digits=2, text_weight=0,
                      needle_weight=3, seed=5)
    ds, ws = (PackedDocumentDataset(prefix + "_nw" + x, 128, shuffle=False) for x in ("", "_weights"))
    for i, doc in enumerate(json.loads(line) for line in open(prefix + "_nw.jsonl")):
        x, w, n = ds.document(i).tolist(), ws.document(i).tolist(), doc["length"]
        answer = len(tok.encode(f" {doc['key']}.")) + 1
        expect = [0] * (n - answer)
        for name in re.findall(r"The (\w+) pass key is \d+\. Remember", tok.decode(x[:n])):
            key = doc["key"] if f"What is the {name} " in tok.decode(x[:n]) else doc["distractors"][0]
            needle = tok.encode(NAMED_NEEDLE.format(name=name, key=key))
            at = [j for j in range(n) if x[j:j + len(needle)] == needle]
            assert len(at) == 1
            expect[at[0]:at[0] + len(needle)] = [3] * len(needle)
        assert w[:n - answer] == expect and w[n - answer:n] == [20] * answer
    # --filler-share: that share of documents on the passkey filler, the others on the plays
    write_needle_data(prefix + "_fs", tok, 128, 40, needles=2, min_length=80, key_digits=2, filler_share=0.5, seed=6)
    docs = [json.loads(line) for line in open(prefix + "_fs.jsonl")]
    filler = [d for d in docs if d["haystack"] == "filler"]
    assert 8 <= len(filler) <= 32
    for d in docs:
        hay = re.sub(r" The \w+ pass key is \d+\. Remember it\. \d+ is the \w+ pass key\.", "", d["text"])
        assert (" The grass" in hay[:20]) == (d["haystack"] == "filler")  # filler windows start there
    with pytest.raises(ValueError, match="filler_share"):
        write_needle_data(str(tmp_path / "bad"), tok, 128, 2, needles=2, min_length=80, filler_share=1.5)


def test_needle_recipe_command_and_hardened_eval(tmp_path):
    """tools/needle_tiny.sh RUN SEED for 3 steps: data, training, needle_recipe.json; `eval needle`
    then reads it (2 needles) at odd lengths with haystack numbers and reports distractor rates;
    `eval passkey` takes the same flags."""
    run = tmp_path / "nt"
    env = dict(os.environ, STEPS="3", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "needle_tiny.sh"), str(run), "7"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert json.loads((run / "needle_recipe.json").read_text()) == {"train_length": 128, "needles": 2,
                                                                    "key_digits": 2, "intro": False}
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["seed"] == 7 and cfg["data"]["seed"] == 7  # initialisation and data order
    assert "seed=7" in (run / "data" / "needle_train.json").read_text()  # and the documents
    out = tmp_path / "needle.json"
    text = run_cli("eval", "needle", "--checkpoint", str(run), "--lengths", "T+5,2T+3", "--depths", "0.5",
                   "--samples", "2", "--haystack-numbers", "3", "--no-memory", "--json", str(out))
    res = json.loads(out.read_text())
    assert res["needles"] == 2 and res["haystack_numbers"] == 3 and res["random_offsets"] is True
    cells = res["results"]["on"]["cells"]
    assert [c["length"] for c in cells] == [133, 259] and "distractor rate" in text
    for c in cells + res["results"]["off"]["cells"]:
        hits = sum(a in d for a, d in zip(c["answers"], c["distractors"]) if a is not None)
        assert c["distractor_rate"] == hits / c["samples"] and all(len(d) == 1 for d in c["distractors"])
    run_cli("eval", "passkey", "--checkpoint", str(run), "--lengths", "T+1", "--depths", "0", "--samples", "1",
            "--haystack-numbers", "2", "--fixed-offsets", "--json", str(out))
    res = json.loads(out.read_text())
    assert res["random_offsets"] is False and res["results"]["on"]["cells"][0]["distractor_rate"] == 0


@pytest.mark.slow
def test_needle_recipe_retrieves_beyond_its_training_length(tmp_path):
    """The full recipe (tools/needle_tiny.sh, seed 0): at 16T (+5 tokens) the asked key of two is
    retrieved from the held-out play with memory above NEEDLE_RECIPE_16T_THRESHOLD, with few
    distractor answers, and not without memory."""
    run = tmp_path / "nt"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "needle_tiny.sh"), str(run), "0"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = tmp_path / "needle.json"
    run_cli("eval", "needle", "--checkpoint", str(run), "--lengths", "16T+5", "--depths", "0,0.25,0.5,0.75,1",
            "--samples", "10", "--seed", "3", "--haystack-numbers", "3", "--no-memory", "--json", str(out),
            timeout=900)
    res = json.loads(out.read_text())["results"]
    on, off = (sum(c["accuracy"] for c in res[m]["cells"]) / len(res[m]["cells"]) for m in ("on", "off"))
    distracted = sum(c["distractor_rate"] for c in res["on"]["cells"]) / len(res["on"]["cells"])
    assert on >= NEEDLE_RECIPE_16T_THRESHOLD and off <= 0.05 and distracted <= 0.1, (on, off, distracted)
