"""The trainer end to end: real torchrun, 2 gloo ranks, the debug config on the shipped corpus."""

import glob
import json
import os

import pytest
import yaml

from train_utils import DEBUG_CONFIG, train

FAST = ["train.eval_interval=0", "checkpoint.save_interval=0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Plain data parallel (ZeRO stage 0), TP=1, 2 ranks: the baseline of the comparisons."""
    run = train(tmp_path_factory.mktemp("ref"), "train.steps=4", "deepspeed.zero_stage=0", *FAST)
    assert run.returncode == 0, run.output[-3000:]
    return run


def test_debug_run_learns_and_logs(tmp_path):
    run = train(tmp_path / "run", "train.steps=30", "train.eval_interval=15", "logging.wandb_mode=offline",
                env={"WANDB_MODE": "offline"})
    assert run.returncode == 0, run.output[-3000:]
    steps = run.steps
    assert [r["step"] for r in steps] == list(range(1, 31))
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "consumed_tokens",
                "peak_mem_gb", "gate/mean", "gate/below_0.1", "gate/above_0.9", "gate/layer1/mean",
                "memory/layer1/M_norm", "memory/layer2/z_mean"):
        assert key in steps[-1], key
    assert steps[-1]["consumed_tokens"] == 30 * 8 * 256
    assert "val_loss" in steps[14] and "val_loss" in steps[29]
    # the gates moved (own lr 1e-2) but none saturated in 30 steps
    assert steps[-1]["gate/mean"] != 0.5
    # resolved config saved, and it round-trips through the loader
    with open(os.path.join(run.run_dir, "config.yaml")) as fh:
        saved = yaml.safe_load(fh)
    assert saved["train"]["steps"] == 30 and saved["logging"]["wandb_mode"] == "offline"
    # offline W&B run directory with the same id the run directory records
    run_id = open(os.path.join(run.run_dir, "wandb_id")).read().strip()
    (record_file,) = glob.glob(os.path.join(run.run_dir, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))
    records = open(record_file, "rb").read()  # protobuf records: history keys are stored as plain strings
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "consumed_tokens", "gate/mean", "val_loss"):
        assert key.encode() in records, f"{key} not logged to W&B"
    # a final checkpoint is there
    assert os.path.isdir(os.path.join(run.run_dir, "checkpoints", "iter_0000030"))

    # resuming continues the same W&B run and appends steps 31-32 to the same metrics file
    more = train(tmp_path / "run", "train.steps=32", "train.eval_interval=0", "logging.wandb_mode=offline",
                 env={"WANDB_MODE": "offline"})
    assert more.returncode == 0, more.output[-3000:]
    assert [r["step"] for r in more.steps] == list(range(1, 33))
    runs = glob.glob(os.path.join(run.run_dir, "wandb", "offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs), runs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_plain_data_parallel(tmp_path, reference, stage):
    run = train(tmp_path / "run", "train.steps=4", f"deepspeed.zero_stage={stage}", *FAST)
    assert run.returncode == 0, run.output[-3000:]
    assert run.losses == pytest.approx(reference.losses, rel=1e-4, abs=1e-4)
    # the global gradient norm too (stage 0 reports the norm DeepSpeed clips with: engine.keep_clipped_norm)
    ref_norms = [r["grad_norm"] for r in reference.steps]
    assert min(ref_norms) > 0 and [r["grad_norm"] for r in run.steps] == pytest.approx(ref_norms, rel=1e-3)


def test_tensor_and_sequence_parallel_match_tp1(tmp_path, reference):
    run = train(tmp_path / "run", "train.steps=4", "deepspeed.zero_stage=0", *FAST,
                "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")
    assert run.returncode == 0, run.output[-3000:]
    assert run.losses == pytest.approx(reference.losses, rel=1e-4, abs=1e-4)
    assert [r["grad_norm"] for r in run.steps] == pytest.approx([r["grad_norm"] for r in reference.steps], rel=1e-3)


def _error(run) -> str:
    lines = [l for l in run.output.splitlines() if "error" in l.lower()]
    return "\n".join(lines)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.seq_length=100"], "must be a multiple of model.segment_length"),
        (["train.global_batch_size=6", "train.micro_batch_size=4"], "must be divisible by train.micro_batch_size"),
        (["model.vocab_size=1000"], "vocab_size mismatch"),
        (["data.train_data=/nonexistent/shard"], "data not found"),
        (["trian.steps=3"], "did you mean 'train'"),
    ],
    ids=["seq-vs-segment", "global-batch", "vocab", "missing-data", "unknown-key"],
)
def test_bad_input_fails_before_work_with_one_clear_line(tmp_path, overrides, message):
    run = train(tmp_path / "run", *overrides, nproc=0, timeout=120)
    assert run.returncode == 2, run.output[-3000:]
    assert message in _error(run), run.output[-3000:]
    assert "Traceback" not in run.output
    assert not os.path.exists(os.path.join(tmp_path, "run", "metrics.jsonl"))


def test_empty_and_foreign_data_are_refused(tmp_path):
    from megatron_infini.data import SHAKESPEARE_TOKENIZER
    from megatron_infini.data.preprocess import preprocess
    from megatron_infini.data.train_tokenizer import train_tokenizer

    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "Too short for one sequence."}) + "\n")
    preprocess([str(tiny)], SHAKESPEARE_TOKENIZER, str(tmp_path / "tiny"), log=lambda *a: None)
    run = train(tmp_path / "run1", f"data.train_data={tmp_path / 'tiny'}", nproc=0, timeout=120)
    assert run.returncode == 2 and "too little data" in _error(run), run.output[-3000:]

    # data tokenized with another tokenizer than the one configured
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i} of a small corpus with words"}) + "\n" for i in range(300)))
    other = train_tokenizer([str(corpus)], 400, str(tmp_path / "other"))
    preprocess([str(corpus)], other, str(tmp_path / "other_data"), log=lambda *a: None)
    run = train(tmp_path / "run2", f"data.train_data={tmp_path / 'other_data'}", nproc=0, timeout=120)
    assert run.returncode == 2 and "use the tokenizer the data was made with" in _error(run), run.output[-3000:]
