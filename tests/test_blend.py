"""Blended datasets (data.blend): Megatron's weighted list, its blending index, exact resume, errors;
and a two-corpus blend through the real trainer (2 ranks), resumed on 1 rank."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from megatron_infini.data import SHAKESPEARE_TRAIN_PREFIX, SHAKESPEARE_VALID_PREFIX
from megatron_infini.data.blend import BlendedDataset, BlendingIndex, corpus_names, open_dataset, parse_blend
from megatron_infini.data.dataset import PackedDocumentDataset

TRAIN, VALID = str(SHAKESPEARE_TRAIN_PREFIX), str(SHAKESPEARE_VALID_PREFIX)


def _naive_index(weights, n):
    """Megatron's build_blending_indices written out: the corpus furthest behind its share."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    counts, corpus, sample = np.zeros(len(w), dtype=np.int64), [], []
    for g in range(n):
        i = int(np.argmax(w * max(g, 1) - counts))  # first of equal errors, as Megatron
        corpus.append(i)
        sample.append(int(counts[i]))
        counts[i] += 1
    return corpus, sample


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 2, 3.5], [0.25, 0.25, 0.5]])
def test_blending_index_is_megatrons(weights):
    n = 3000
    idx = BlendingIndex(weights)
    idx.ensure(n)
    corpus, sample = _naive_index(weights, n)
    assert idx.corpus[:n].tolist() == corpus and idx.sample[:n].tolist() == sample
    try:  # Megatron's own compiled helper, where this megatron-core ships it built
        from megatron.core.datasets import helpers_cpp
    except ImportError:
        return
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    di, ds = np.zeros(n, dtype=np.int16), np.zeros(n, dtype=np.int64)
    helpers_cpp.build_blending_indices(di, ds, w, len(w), n, False)
    assert np.array_equal(idx.corpus[:n], di) and np.array_equal(idx.sample[:n], ds)


def test_parse_blend():
    assert parse_blend("") == [] and parse_blend(None) == []
    assert parse_blend("data/a") == [(1.0, "data/a")]
    assert parse_blend("/data/a b") == [(1.0, "/data/a b")]  # a path with a space is not a blend
    assert parse_blend(["data/a"]) == [(1.0, "data/a")]
    assert parse_blend([0.7, "a", 0.3, "b"]) == [(0.7, "a"), (0.3, "b")]
    assert parse_blend("0.7 a 3e-1 b") == [(0.7, "a"), (0.3, "b")]  # Megatron's --data-path text
    assert parse_blend(["2", "a", 1, "b"]) == [(2.0, "a"), (1.0, "b")]
    with pytest.raises(ValueError, match="data.train_data: .*odd number of items \\(3\\)"):
        parse_blend([0.7, "a", 0.3])
    with pytest.raises(ValueError, match="odd number"):
        parse_blend("0.7 a 0.3")
    for bad in (0, -1, "x", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="the weight of 'b' must be a positive number"):
            parse_blend([1, "a", bad, "b"])
    with pytest.raises(ValueError, match="must be a data prefix"):
        parse_blend([1, "a", 1, ""])
    assert corpus_names(["x/a", "y/b", "z/a"]) == ["a#0", "b", "a#2"]


def test_shares_and_samples_follow_the_weights():
    blend = BlendedDataset([(0.7, TRAIN), (0.3, VALID)], 64, seed=3)
    alone = [PackedDocumentDataset(TRAIN, 64, seed=3), PackedDocumentDataset(VALID, 64, seed=3)]
    n = 10_000
    blend.consumed_samples = n
    counts = blend.corpus_samples()
    assert set(counts) == {"samples/shakespeare_train", "samples/shakespeare_valid"}
    assert abs(counts["samples/shakespeare_train"] / n - 0.7) < 0.01
    assert abs(counts["samples/shakespeare_valid"] / n - 0.3) < 0.01
    assert sum(counts.values()) == n
    seen = [0, 0]  # every sample is the next sample of its corpus
    for g in range(0, n, 97):
        c = int(blend.index.corpus[g])
        seen = [int((blend.index.corpus[:g] == i).sum()) for i in range(2)]
        np.testing.assert_array_equal(blend[g], alone[c][seen[c]])
    # a single corpus is the plain dataset, unchanged
    assert type(open_dataset([(1.0, TRAIN)], 64)) is PackedDocumentDataset


def _stream(ds, b, steps):
    return torch.cat([batch for batch in ds.batches(b, steps)])


def test_resume_is_exact_also_at_another_data_parallel_size():
    blend = [(0.6, TRAIN), (0.4, VALID)]
    b = 2
    straight = _stream(BlendedDataset(blend, 32, seed=1), 4 * b, 12)  # dp=1, micro batch 4b: 12 steps
    # dp=4, micro batch b: 5 steps, then the checkpoint, resumed on dp=2 with micro batch 2b
    ranks = [BlendedDataset(blend, 32, seed=1, dp_rank=r, dp_world_size=4) for r in range(4)]
    first = [[batch for batch in ds.batches(b, 5)] for ds in ranks]
    state = json.loads(json.dumps(ranks[0].state_dict()))
    got = [torch.cat([first[r][k] for r in range(4)]) for k in range(5)]
    resumed = [BlendedDataset(blend, 32, seed=1, dp_rank=r, dp_world_size=2) for r in range(2)]
    for ds in resumed:
        ds.load_state_dict(state)
    rest = [[batch for batch in ds.batches(2 * b, 7)] for ds in resumed]
    got += [torch.cat([rest[r][k] for r in range(2)]) for k in range(7)]
    assert torch.equal(torch.cat(got), straight)

    other = BlendedDataset([(0.5, TRAIN), (0.5, VALID)], 32, seed=1)
    with pytest.raises(ValueError, match="blend weights"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="saved for a single corpus"):
        other.load_state_dict(PackedDocumentDataset(TRAIN, 32, seed=1).state_dict())
    with pytest.raises(ValueError, match="saved for a blend of 2 corpora"):
        PackedDocumentDataset(TRAIN, 32, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="checkpoint has seed=1"):
        BlendedDataset(blend, 32, seed=2).load_state_dict(state)


def test_blend_errors(tmp_path):
    with pytest.raises(ValueError, match="data not found: .*nowhere.bin"):
        BlendedDataset([(1, TRAIN), (1, str(tmp_path / "nowhere"))], 64)
    for suffix in (".bin", ".idx"):  # the held-out play, "made with another tokenizer"
        shutil.copy(VALID + suffix, tmp_path / f"other{suffix}")
    meta = json.load(open(VALID + ".json"))
    json.dump({**meta, "tokenizer_fingerprint": "0123456789abcdef"}, open(tmp_path / "other.json", "w"))
    with pytest.raises(ValueError, match="made with different tokenizers"):
        BlendedDataset([(1, TRAIN), (1, str(tmp_path / "other"))], 64)


# --------------------------------------------------------------------------- the trainer
RESETS = ["data.reset_attention_mask=true", "data.reset_position_ids=true", "data.eod_mask_loss=true"]


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """100 documents of 2-39 lines of the first play (tools/short_documents.py): every 256-token
    window holds several documents."""
    import sys

    from train_utils import REPO

    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        from short_documents import make_short_documents
    finally:
        sys.path.pop(0)
    prefix = str(tmp_path_factory.mktemp("short") / "short")
    make_short_documents(prefix, plays=1, max_docs=100)
    return prefix


def test_trainer_blend_with_resets_resumes_exactly_on_another_dp_size(tmp_path, short_docs):
    """A two-corpus blend read with the document resets (packed sequences through the Infini layer),
    2 ranks (dp=2), 4 steps with a checkpoint at step 2; resumed from it on one rank (dp=1, same
    global batch): steps 3-4 have the same losses and per-corpus counts."""
    from train_utils import train

    blend = f"data.train_data=[0.7, {TRAIN}, 0.3, {short_docs}]"
    run = train(tmp_path / "dp2", blend, *RESETS, "train.steps=4", "checkpoint.save_interval=2",
                "checkpoint.keep_last=0", "train.eval_interval=0")
    assert run.returncode == 0, run.output[-3000:]
    steps = run.steps
    for r in steps:  # global batch 8 per step
        assert r["samples/shakespeare_train"] + r["samples/short"] == 8 * r["step"]
    assert steps[-1]["samples/short"] == 10  # 30% of 32 samples, Megatron's rounding
    ckpt = os.path.join(run.run_dir, "checkpoints", "iter_0000002")
    resumed = train(tmp_path / "dp1", blend, *RESETS, "train.steps=4", "train.eval_interval=0",
                    f"checkpoint.resume={ckpt}", nproc=1)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert [r["step"] for r in resumed.steps] == [3, 4]
    assert resumed.losses == pytest.approx(run.losses[2:], rel=1e-4, abs=1e-4)
    for a, b in zip(resumed.steps, steps[2:]):
        assert {k: v for k, v in a.items() if k.startswith("samples/")} == \
               {k: v for k, v in b.items() if k.startswith("samples/")}


@pytest.mark.slow
def test_trainer_resets_tensor_and_sequence_parallel_match_tp1(tmp_path, short_docs):
    """Packed documents (every window holds several): TP=2 + sequence parallel logs TP=1's losses,
    and the resets do change them (the windows are not read as one stream)."""
    from train_utils import train

    common = [f"data.train_data={short_docs}", "train.steps=4", "deepspeed.zero_stage=0",
              "train.eval_interval=0", "checkpoint.save_interval=0", "checkpoint.save_at_end=false"]
    ref = train(tmp_path / "tp1", *common, *RESETS)
    assert ref.returncode == 0, ref.output[-3000:]
    tp2 = train(tmp_path / "tp2", *common, *RESETS, "parallel.tensor_model_parallel_size=2",
                "parallel.sequence_parallel=true")
    assert tp2.returncode == 0, tp2.output[-3000:]
    assert tp2.losses == pytest.approx(ref.losses, rel=1e-4, abs=1e-4)
    off = train(tmp_path / "off", *common)
    assert off.returncode == 0, off.output[-3000:]
    assert abs(off.losses[-1] - ref.losses[-1]) > 1e-3


@pytest.mark.slow
def test_trainer_resets_context_parallel_matches_cp1(tmp_path, short_docs):
    """Packed documents under context parallelism: CP=2 (dp=1) logs the losses of CP=1 (dp=2), both
    on 2 ranks. One window of 256 tokens per micro batch, 128 per rank, segment 64: the document
    holding token 128 crosses the rank boundary, nearly always inside one of its segments."""
    from train_utils import train

    common = [f"data.train_data={short_docs}", "train.steps=3", "deepspeed.zero_stage=0",
              "train.eval_interval=0", "checkpoint.save_interval=0", "checkpoint.save_at_end=false",
              "train.micro_batch_size=1", *RESETS]
    ref = train(tmp_path / "cp1", *common)
    assert ref.returncode == 0, ref.output[-3000:]
    cp2 = train(tmp_path / "cp2", *common, "parallel.context_parallel_size=2")
    assert cp2.returncode == 0, cp2.output[-3000:]
    assert len(cp2.losses) == 3
    assert cp2.losses == pytest.approx(ref.losses, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (["data.train_data=[0.7, a, 0.3]"], "odd number of items"),
    (["data.train_data=[0, a, 1, b]"], "the weight of 'a' must be a positive number"),
    (["data.train_data=0.5 a 0.5 b", "data.train_loss_weights=w"], "cannot be combined with a blended"),
], ids=["odd", "weight", "loss-weights"])
def test_trainer_refuses_bad_data_settings_with_exit_code_2(tmp_path, overrides, message):
    from train_utils import train

    run = train(tmp_path / "run", *overrides, nproc=0, timeout=120)
    assert run.returncode == 2 and message in run.output, run.output[-3000:]
    assert "Traceback" not in run.output
