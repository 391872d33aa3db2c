"""Both tokenizer kinds (sentencepiece `.model`, Hugging Face `tokenizer.json`) behind one
interface: training, lossless round trips, special ids, fingerprints, parallel preprocessing,
the data/tokenizer mismatch check, files AutoTokenizer loads, and each kind end to end (train
a tokenizer, preprocess, train 2 steps, generate)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_infini.data import CORPUS_DIR, SHAKESPEARE_TOKENIZER
from megatron_infini.data import preprocess as preprocess_mod
from megatron_infini.data import train_tokenizer as train_tokenizer_mod
from megatron_infini.data.preprocess import check_tokenizer, indexed_dataset_module, preprocess, read_metadata
from megatron_infini.data.tokenizer import KINDS, Tokenizer, write_export_files
from train_utils import DEBUG_CONFIG, REPO, Run, run_cli, train

VALID = CORPUS_DIR / "shakespeare_valid.jsonl"
ODD = "Year 1603:\n\n  two  spaces,\ttab, é, 漢字, emoji 🙂 and ~{braces}~"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """kind -> a 500-token tokenizer of that kind trained on the held-out play with the CLI."""
    d = tmp_path_factory.mktemp("tok")
    out = {}
    for kind in KINDS:
        rc = train_tokenizer_mod.main(["--input", str(VALID), "--vocab-size", "500", "--output-prefix",
                                       str(d / kind), "--kind", kind, "--num-threads", "1"])
        assert rc == 0
        out[kind] = str(d / kind) + (".model" if kind == "sentencepiece" else ".json")
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_trained_tokenizers_are_lossless_with_fixed_specials(tokenizers, kind):
    t = Tokenizer(tokenizers[kind])
    assert t.kind == kind and (t.vocab_size, t.bos_id, t.eos_id, t.pad_id) == (500, 1, 2, 3)
    text = json.loads(VALID.read_text(encoding="utf-8").splitlines()[0])["text"]
    for sample in (text, ODD):
        assert t.decode(t.encode(sample)) == sample
    ids = t.encode("pass key 9071853264", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and t.decode(ids) == "pass key 9071853264"
    assert [t.id_to_piece(i) for i in ids[-11:-1]] == list("9071853264")  # one piece per digit
    assert t.encode_batch(["a b", "", "c"], eos=True) == [t.encode("a b", eos=True), [2], t.encode("c", eos=True)]


def test_kind_is_chosen_by_the_file_and_bad_files_are_named(tmp_path, tokenizers):
    hf = tmp_path / "model_dir"
    hf.mkdir()
    (hf / "tokenizer.json").write_bytes(open(tokenizers["huggingface"], "rb").read())
    assert Tokenizer(hf).kind == "huggingface" and Tokenizer(SHAKESPEARE_TOKENIZER).kind == "sentencepiece"
    assert Tokenizer(hf).fingerprint == Tokenizer(tokenizers["huggingface"]).fingerprint
    fingerprints = {Tokenizer(p).fingerprint for p in [*tokenizers.values(), SHAKESPEARE_TOKENIZER]}
    assert len(fingerprints) == 3
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json: .*junk.json"):
        Tokenizer(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="has no tokenizer.json or tokenizer.model"):
        Tokenizer(tmp_path)
    with pytest.raises(ValueError, match="kind must be one of"):
        train_tokenizer_mod.train_tokenizer([VALID], 500, tmp_path / "x", kind="wordpiece")
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        train_tokenizer_mod.train_tokenizer([VALID], 60000, tmp_path / "x", kind="huggingface")


def test_parallel_preprocessing_writes_the_same_shards(tmp_path, tokenizers, capsys):
    """--workers 2 (forked processes, small batches) gives the bytes of one in-process worker."""
    prefixes = {}
    for workers in (1, 2):
        prefixes[workers] = tmp_path / f"w{workers}"
        rc = preprocess_mod.main(["--input", str(CORPUS_DIR / "shakespeare_train.jsonl"), str(VALID),
                                  "--tokenizer", tokenizers["huggingface"], "--output-prefix",
                                  str(prefixes[workers]), "--workers", str(workers)])
        assert rc == 0
    out = capsys.readouterr().out
    assert "tokens/s, huggingface tokenizer, 2 worker(s)" in out
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()
    meta = read_metadata(prefixes[2])
    t = Tokenizer(tokenizers["huggingface"])
    assert (meta["tokenizer_kind"], meta["tokenizer_fingerprint"], meta["num_documents"]) == ("huggingface", t.fingerprint, 8)
    indexed = indexed_dataset_module().IndexedDataset(str(prefixes[2]))
    valid_text = json.loads(VALID.read_text(encoding="utf-8"))["text"]
    assert indexed[7].tolist() == t.encode(valid_text, eos=True)
    # batches smaller than one document, in workers: the same again
    small = preprocess([VALID], t, tmp_path / "small", log=None, workers=2, batch_chars=1)
    small_indexed = indexed_dataset_module().IndexedDataset(str(tmp_path / "small"))  # keep: arrays view its mmap
    assert small["num_tokens"] == len(indexed[7]) and np.array_equal(small_indexed[0], indexed[7])


def test_data_made_with_another_tokenizer_is_refused_in_one_line(tmp_path, tokenizers):
    sp, hf = (Tokenizer(tokenizers[k]) for k in KINDS)
    meta = preprocess([VALID], sp, tmp_path / "sp", log=None)
    check_tokenizer(meta, sp, tmp_path / "sp")  # its own tokenizer: fine
    check_tokenizer(None, hf, tmp_path / "sp")  # shards without metadata: nothing to check
    with pytest.raises(ValueError) as e:  # same vocabulary size, another tokenizer
        check_tokenizer(meta, hf, tmp_path / "sp")
    msg = str(e.value)
    assert "\n" not in msg and "use the tokenizer the data was made with" in msg
    assert "kind huggingface" in msg and "kind sentencepiece" in msg and sp.fingerprint in msg
    older = {k: v for k, v in meta.items() if k not in ("tokenizer_kind", "tokenizer_fingerprint")}
    check_tokenizer(older, hf, tmp_path / "sp")  # shards from before fingerprints: vocab size only
    with pytest.raises(ValueError, match="vocab_size 4096"):
        check_tokenizer(older, Tokenizer(SHAKESPEARE_TOKENIZER), tmp_path / "sp")


@pytest.mark.parametrize("kind", KINDS)
def test_export_files_load_in_auto_tokenizer(tmp_path, tokenizers, kind):
    transformers = pytest.importorskip("transformers")
    t = Tokenizer(tokenizers[kind])
    names = write_export_files(t, str(tmp_path))
    assert sorted(names) == sorted(["tokenizer_config.json", "tokenizer.json" if kind == "huggingface"
                                    else "tokenizer.model"])
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = json.loads(VALID.read_text(encoding="utf-8"))["text"][:3000] + ODD
    assert auto(text)["input_ids"] == t.encode(text, bos=True)
    assert auto.decode(t.encode(text, bos=True, eos=True), skip_special_tokens=True) == text
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (1, 2, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_end_to_end(tmp_path, tokenizers, kind):
    """Trained tokenizer -> preprocess -> 2 training steps -> generate, with that tokenizer
    found in the checkpoint (not in the config) and recorded in its meta.json."""
    tok_path = tokenizers[kind]
    t = Tokenizer(tok_path)
    preprocess([VALID], t, tmp_path / "data", log=None)
    overrides = [f"data.train_data={tmp_path / 'data'}", f"data.tokenizer={tok_path}", "train.steps=2",
                 "train.eval_interval=0", "deepspeed.zero_stage=0"]
    if kind == "huggingface":
        run = train(tmp_path / "run", *overrides, nproc=0, timeout=300)  # python -m megatron_infini train
        assert run.returncode == 0, run.output[-3000:]
    else:  # docs/slurm.md's `python -m launch local` (torchrun on this machine), with one rank
        run = Run(0, "", str(tmp_path / "run"))
        env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
        p = subprocess.run([sys.executable, "-m", "launch", "local", "--config", DEBUG_CONFIG, "--nproc", "1",
                            f"run_dir={run.run_dir}", "logging.progress_bar=false", *overrides], cwd=REPO,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:]
    ckpt = os.path.join(run.run_dir, "checkpoints", "iter_0000002")
    meta = json.load(open(os.path.join(ckpt, "meta.json")))
    assert meta["tokenizer"]["kind"] == kind and meta["tokenizer"]["fingerprint"] == t.fingerprint
    assert meta["vocab_size"] == 512  # 500 padded to a multiple of 128
    os.rename(tok_path, tok_path + ".moved")  # generation must use the checkpoint's copy
    try:
        out = tmp_path / "gen.json"
        run_cli("generate", "--checkpoint", run.run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "6",
                "--json", str(out))
    finally:
        os.rename(tok_path + ".moved", tok_path)
    result = json.load(open(out))
    assert result["prompt_tokens"] == len(t.encode("ROMEO:", bos=True))
    assert len(result["ids"]) <= 6 and all(0 <= i < t.vocab_size for i in result["ids"])
    assert result["text"] == t.decode(result["ids"])


def test_passkey_prompts_with_a_hugging_face_tokenizer(tokenizers):
    """Evaluation prompts go through the same interface: exact lengths, the key decodes back."""
    from megatron_infini.evaluation.passkey_data import PasskeyBuilder, parse_key

    t = Tokenizer(tokenizers["huggingface"])
    b = PasskeyBuilder(t)
    assert b.intro[0] == t.bos_id
    for depth in (0.0, 0.5, 1.0):
        s = b.build(600, depth, 31337)
        assert len(s.ids) == 600 and parse_key(t.decode(s.ids[s.needle_start:s.needle_end])) == 31337
        assert t.decode(s.ids).endswith("What is the pass key? The pass key is")
    assert t.decode(b.answer(42)).strip() == "42."
