"""Data pipeline: tokenizer, preprocessing into indexed shards, packed document dataset.

The dataset's samples are compared with a naive oracle: the whole epoch's token stream built
by concatenating the documents in the epoch's order, cut into overlapping windows.
"""

import json

import numpy as np
import pytest
import torch

from megatron_infini.data import (
    CORPUS_DIR,
    SHAKESPEARE_TOKENIZER,
    SHAKESPEARE_TRAIN_PREFIX,
    SHAKESPEARE_VALID_PREFIX,
)
from megatron_infini.data import preprocess as preprocess_mod
from megatron_infini.data import train_tokenizer as train_tokenizer_mod
from megatron_infini.data.dataset import PackedDocumentDataset, check_vocab
from megatron_infini.data.preprocess import indexed_dataset_module, preprocess, read_metadata
from megatron_infini.data.tokenizer import Tokenizer
from megatron_infini.data.train_tokenizer import train_tokenizer


def _corpus_texts(split="train"):
    with open(CORPUS_DIR / f"shakespeare_{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(SHAKESPEARE_TOKENIZER)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """9 documents of awkward, unequal lengths (one JSONL, one text file), preprocessed."""
    d = tmp_path_factory.mktemp("corpus")
    text = _corpus_texts()[0]
    sizes = [3000, 517, 12000, 1, 4099, 800, 7000, 2500]
    docs, pos = [], 0
    for n in sizes:
        docs.append(text[pos:pos + n] if n > 1 else "Q")  # a one-token document too
        pos += n
    with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"body": doc, "id": i}) + "\n")
        f.write("\n")  # blank lines are skipped
        f.write(json.dumps({"body": "   "}) + "\n")  # empty documents are skipped
    (d / "extra.txt").write_text("A text file is one document: 12345 and 67890.\n", encoding="utf-8")
    docs.append((d / "extra.txt").read_text(encoding="utf-8"))
    meta = preprocess([d / "docs.jsonl", d / "extra.txt"], SHAKESPEARE_TOKENIZER, d / "out" / "small",
                      json_key="body", log=None)
    return {"dir": d, "docs": docs, "prefix": d / "out" / "small", "meta": meta}


# ----- tokenizer -----

def test_tokenizer_round_trip_on_corpus(tok):
    for text in _corpus_texts("train") + _corpus_texts("valid"):
        assert tok.decode(tok.encode(text)) == text
    odd = "Year 1603:\n\n  two  spaces,\ttab, é, 漢字, emoji 🙂 and ~{braces}~"
    assert tok.decode(tok.encode(odd)) == odd


def test_tokenizer_special_ids_and_digits(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (4096, 1, 2, 3)
    ids = tok.encode("passkey 9071853264", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces[-11:-1] == list("9071853264")  # one piece per digit, not byte fallback
    assert tok.decode(ids) == "passkey 9071853264"


def test_tokenizer_bad_files(tmp_path):
    with pytest.raises(ValueError, match="tokenizer model not found.*nope.model"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")


def test_train_tokenizer(tmp_path, small_corpus):
    path = train_tokenizer([small_corpus["dir"] / "docs.jsonl"], 600, tmp_path / "tok", json_key="body")
    t = Tokenizer(path)
    assert (t.vocab_size, t.bos_id, t.eos_id, t.pad_id) == (600, 1, 2, 3)
    assert (tmp_path / "tok.vocab").read_text(encoding="utf-8").count("\n") == 600
    for doc in small_corpus["docs"]:
        assert t.decode(t.encode(doc)) == doc
    assert [t.id_to_piece(i) for i in t.encode("2024")] == ["2", "0", "2", "4"]
    # the same inputs give the same model
    again = train_tokenizer([small_corpus["dir"] / "docs.jsonl"], 600, tmp_path / "tok2", json_key="body")
    assert open(again, "rb").read() == open(path, "rb").read()


def test_train_tokenizer_errors(tmp_path, small_corpus):
    src = small_corpus["dir"] / "docs.jsonl"
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        train_tokenizer([src], 100_000, tmp_path / "tok", json_key="body")
    with pytest.raises(ValueError, match="vocab_size must be >"):
        train_tokenizer([src], 100, tmp_path / "tok", json_key="body")
    with pytest.raises(ValueError, match="model_type must be one of"):
        train_tokenizer([src], 600, tmp_path / "tok", model_type="wordpiece", json_key="body")
    with pytest.raises(ValueError, match="no key 'text'"):
        train_tokenizer([src], 600, tmp_path / "tok")
    assert not (tmp_path / "tok.model").exists()


# ----- preprocessing -----

def test_preprocess_reads_back_as_direct_tokenization(tok, small_corpus):
    indexed = indexed_dataset_module().IndexedDataset(str(small_corpus["prefix"]))
    docs = small_corpus["docs"]
    assert len(indexed) == len(docs)
    for i, doc in enumerate(docs):
        assert indexed[i].tolist() == tok.encode(doc) + [tok.eos_id]
    meta = read_metadata(small_corpus["prefix"])
    assert meta == small_corpus["meta"]
    assert meta["num_documents"] == len(docs) and meta["num_empty_documents_skipped"] == 1
    assert meta["tokenizer_vocab_size"] == 4096 and meta["dtype"] == "uint16"
    assert meta["num_tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)


@pytest.mark.parametrize("split", ["train", "valid"])
def test_shipped_shards_match_corpus_and_tokenizer(tok, split):
    prefix = {"train": SHAKESPEARE_TRAIN_PREFIX, "valid": SHAKESPEARE_VALID_PREFIX}[split]
    indexed = indexed_dataset_module().IndexedDataset(str(prefix))
    texts = _corpus_texts(split)
    assert len(indexed) == len(texts)
    for i, text in enumerate(texts):
        assert indexed[i].tolist() == tok.encode(text) + [tok.eos_id], "stale shards: see corpus/README.md"


def test_preprocess_errors_before_any_work(tmp_path):
    out = tmp_path / "out" / "x"
    cases = {
        "input not found: .*missing.jsonl": [tmp_path / "missing.jsonl"],
        "input file is empty: .*empty.txt": [tmp_path / "empty.txt"],
        r"bad.jsonl:2: not valid JSON": [tmp_path / "bad.jsonl"],
        r"nokey.jsonl:1: no key 'text'": [tmp_path / "nokey.jsonl"],
        "unknown file kind '.csv'": [tmp_path / "data.csv"],
        "no input files": [],
    }
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    (tmp_path / "nokey.jsonl").write_text('{"content": "x"}\n')
    (tmp_path / "data.csv").write_text("a,b\n")
    for message, inputs in cases.items():
        with pytest.raises(ValueError, match=message):
            preprocess(inputs, SHAKESPEARE_TOKENIZER, out, log=None)
    with pytest.raises(ValueError, match="tokenizer model not found"):
        preprocess([tmp_path / "bad.jsonl"], tmp_path / "none.model", out, log=None)
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": "\\n"}\n')
    with pytest.raises(ValueError, match="no non-empty documents"):
        preprocess([tmp_path / "blank.jsonl"], SHAKESPEARE_TOKENIZER, out, log=None)
    # a bad line deep in a file is found mid-run: nothing half-written is left behind
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_command_lines_report_errors_without_traceback(tmp_path, capsys):
    rc = preprocess_mod.main(["--input", str(tmp_path / "nope.jsonl"), "--tokenizer",
                              str(SHAKESPEARE_TOKENIZER), "--output-prefix", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "preprocess_data: error: input not found" in err and "Traceback" not in err
    rc = train_tokenizer_mod.main(["--input", str(tmp_path), "--vocab-size", "500", "--output-prefix",
                                   str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 2 and "has no text or JSONL files" in err


def test_preprocess_command_line(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("To be, or not to be.\n")
    rc = preprocess_mod.main(["--input", str(tmp_path / "a.txt"), "--tokenizer", str(SHAKESPEARE_TOKENIZER),
                              "--output-prefix", str(tmp_path / "o" / "a")])
    assert rc == 0 and "1 docs" in capsys.readouterr().out
    assert all((tmp_path / "o" / f"a{s}").is_file() for s in (".bin", ".idx", ".json"))


# ----- packed document dataset -----

def _oracle_stream(ds, epoch):
    """Naive reference: the epoch's documents concatenated in the epoch's order."""
    return np.concatenate([ds.document(int(i)) for i in ds.document_order(epoch)])


@pytest.mark.parametrize("seq_length", [1, 97, 1000])
def test_samples_are_windows_of_the_shuffled_document_stream(small_corpus, tok, seq_length):
    ds = PackedDocumentDataset(small_corpus["prefix"], seq_length, seed=7)
    docs = small_corpus["docs"]
    assert ds.num_documents == len(docs) and len(ds) == (ds.num_tokens - 1) // seq_length
    for d in range(len(docs)):  # documents are whole, each ending in EOS
        assert ds.document(d).tolist() == tok.encode(docs[d]) + [tok.eos_id]
    for epoch in (0, 1, 2):
        order = ds.document_order(epoch)
        assert sorted(order.tolist()) == list(range(len(docs)))
        stream = _oracle_stream(ds, epoch)
        for k in sorted({0, 1, len(ds) // 2, len(ds) - 1}):
            sample = ds[epoch * len(ds) + k]
            assert sample.dtype == np.int64 and sample.shape == (seq_length + 1,)
            np.testing.assert_array_equal(sample, stream[k * seq_length:k * seq_length + seq_length + 1])
    assert not np.array_equal(ds.document_order(0), ds.document_order(1))  # reshuffled per epoch


def test_no_shuffle_keeps_file_order(small_corpus):
    ds = PackedDocumentDataset(small_corpus["prefix"], 64, shuffle=False)
    assert ds.document_order(3).tolist() == list(range(ds.num_documents))
    stream = np.concatenate([ds.document(i) for i in range(ds.num_documents)])
    np.testing.assert_array_equal(ds[len(ds) + 2], stream[128:193])


def test_deterministic_given_seed():
    a = PackedDocumentDataset(SHAKESPEARE_TRAIN_PREFIX, 256, seed=3)
    b = PackedDocumentDataset(SHAKESPEARE_TRAIN_PREFIX, 256, seed=3)
    c = PackedDocumentDataset(SHAKESPEARE_TRAIN_PREFIX, 256, seed=4)
    ba, bb, bc = next(a.batches(4, 1)), next(b.batches(4, 1)), next(c.batches(4, 1))
    assert ba.dtype == torch.long and ba.shape == (4, 257)
    assert torch.equal(ba, bb)
    assert not torch.equal(ba, bc)
    assert not all(torch.equal(x, y) for x, y in zip(a.batches(4, 20), c.batches(4, 20)))


def test_data_parallel_shards_are_disjoint_and_cover(small_corpus):
    world, b, steps = 3, 2, 7
    ranks = [PackedDocumentDataset(small_corpus["prefix"], 50, seed=1, dp_rank=r, dp_world_size=world)
             for r in range(world)]
    ref = PackedDocumentDataset(small_corpus["prefix"], 50, seed=1)
    seen = []
    for step in range(steps):
        for r, ds in enumerate(ranks):
            indices = list(ds.rank_sample_indices(ds.consumed_samples, b))
            batch = next(ds.batches(b))
            for row, g in zip(batch, indices):
                np.testing.assert_array_equal(row.numpy(), ref[g])
            seen += indices
    assert sorted(seen) == list(range(world * b * steps))  # disjoint and covering
    assert seen[:b] == [0, 1] and seen[b:2 * b] == [2, 3]  # Megatron's contiguous blocks
    assert {ds.consumed_samples for ds in ranks} == {world * b * steps}


def test_state_dict_resumes_exactly(small_corpus):
    ds = PackedDocumentDataset(small_corpus["prefix"], 128, seed=5, dp_rank=1, dp_world_size=2)
    it = ds.batches(3)
    for _ in range(len(ds) // 6 + 2):  # past the end of epoch 0
        next(it)
    state = json.loads(json.dumps(ds.state_dict()))  # survives serialisation
    assert state["epoch"] == 1
    expected = [next(it) for _ in range(4)]

    resumed = PackedDocumentDataset(small_corpus["prefix"], 128, seed=5, dp_rank=1, dp_world_size=2)
    resumed.load_state_dict(state)
    for want, got in zip(expected, resumed.batches(3, 4)):
        assert torch.equal(want, got)

    # a different data-parallel size continues the same global stream
    single = PackedDocumentDataset(small_corpus["prefix"], 128, seed=5)
    single.load_state_dict(state)
    nxt = next(single.batches(6))
    assert torch.equal(nxt[3:], expected[0])

    for key, value in (("seed", 6), ("seq_length", 64), ("num_tokens", 1)):
        with pytest.raises(ValueError, match=f"data state mismatch: checkpoint has {key}="):
            single.load_state_dict({**state, key: value})


def test_dataset_errors(tmp_path, small_corpus):
    with pytest.raises(ValueError, match="data not found: .*nowhere.bin"):
        PackedDocumentDataset(tmp_path / "nowhere", 16)
    with pytest.raises(ValueError, match="too little data .* need at least seq_length \\+ 1"):
        PackedDocumentDataset(small_corpus["prefix"], small_corpus["meta"]["num_tokens"])
    PackedDocumentDataset(small_corpus["prefix"], small_corpus["meta"]["num_tokens"] - 1)  # exactly one sample
    with pytest.raises(ValueError, match="tokenizer has 4096 tokens but the model's vocab_size is 4000"):
        PackedDocumentDataset(small_corpus["prefix"], 16, model_vocab_size=4000)
    PackedDocumentDataset(small_corpus["prefix"], 16, model_vocab_size=4096)
    with pytest.raises(ValueError, match="dp_rank"):
        PackedDocumentDataset(small_corpus["prefix"], 16, dp_rank=2, dp_world_size=2)
    with pytest.raises(ValueError, match="seq_length must be"):
        PackedDocumentDataset(small_corpus["prefix"], 0)
    (tmp_path / "junk.bin").write_bytes(b"\0" * 8)
    (tmp_path / "junk.idx").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="cannot read indexed dataset"):
        PackedDocumentDataset(tmp_path / "junk", 16)


def test_check_vocab():
    check_vocab(4096, 4096)
    check_vocab(4096, 4224)  # Megatron pads the model's vocabulary up
    with pytest.raises(ValueError, match="at least 4096"):
        check_vocab(4096, 4095)
