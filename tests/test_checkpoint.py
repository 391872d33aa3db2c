"""Checkpoints end to end: exact resume, TP change (optimizer resharded; see also test_reshard.py), crash mid-save, corruption, stop requests,
a dying rank, keep-last-K pruning, and the converter. Two gloo processes on CPU, fp32.

Each training run is the debug config for 6 steps (~15 s, mostly start-up); runs are shared
between tests through module-scoped fixtures and copied before a test changes them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_infini.checkpointing import manifest as mf
from megatron_infini.checkpointing.manager import (
    CRASH_HOOK, CheckpointManager, complete_checkpoints, iter_dir, read_tracker)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--config", os.path.join(REPO, "configs", "debug.yaml"), "train.steps=6", "train.eval_interval=0",
          "checkpoint.save_interval=3", "logging.progress_bar=false", "logging.wandb_mode=disabled"]
TOL = 1e-6


def _env(extra=None):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # DeepSpeed JIT-builds its CPU shared-memory op; a private cache keeps other checkouts'
    # builds from invalidating ours (a rebuild costs ~50 s on 2 cores).
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    env.update(extra or {})
    return env


def train(run_dir, *overrides, env=None, timeout=300, check=True):
    """torchrun 2 processes; returns the CompletedProcess (stdout+stderr in .stdout)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_infini.train",
           *COMMON, f"run_dir={run_dir}", *overrides]
    log = str(run_dir) + ".log"  # a file, not a pipe: a killed rank's helpers must not block us
    with open(log, "w") as fh:
        p = subprocess.run(cmd, env=_env(env), stdout=fh, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout, cwd=REPO)
    p.stdout = open(log).read()
    if check and p.returncode != 0:
        raise AssertionError(f"training failed (rc {p.returncode}):\n{p.stdout[-4000:]}")
    return p


def spawn_ranks(run_dir, *overrides, env=None):
    """2 trainer processes without torchrun, so each rank's exit code can be read."""
    from _dist import free_port

    port = str(free_port())
    procs = []
    for rank in range(2):
        e = _env(dict(env or {}, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        log = open(os.path.join(str(run_dir) + f".rank{rank}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_infini.train", *COMMON,
                                       f"run_dir={run_dir}", *overrides],
                                      env=e, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    return procs


def records(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


def losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def wait_for_step(run_dir, step, procs, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if max(losses(run_dir), default=0) >= step:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited early: {[p.poll() for p in procs]}")
        time.sleep(0.2)
    raise AssertionError(f"no step {step} after {timeout} s")


def assert_same(ref, got, steps, tol=TOL):
    diffs = {s: abs(ref[s] - got[s]) for s in steps}
    assert max(diffs.values()) <= tol, f"losses differ: {diffs}\nref {ref}\ngot {got}"


def copy_run(src, dst):
    shutil.copytree(src, dst)
    for name in ("metrics.jsonl",):  # the copy logs its own steps
        if os.path.exists(os.path.join(dst, name)):
            os.remove(os.path.join(dst, name))
    return dst


# --------------------------------------------------------------------------- shared base runs

_BASE = {}


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    """6 steps with checkpoints at 3 and 6, per (ZeRO stage, TP): built on first use."""
    root = tmp_path_factory.mktemp("base")

    def get(zero, tp):
        key = (zero, tp)
        if key not in _BASE:
            run_dir = str(root / f"z{zero}tp{tp}")
            train(run_dir, f"deepspeed.zero_stage={zero}", f"parallel.tensor_model_parallel_size={tp}")
            _BASE[key] = run_dir
        return _BASE[key]

    yield get
    _BASE.clear()


LAYOUTS = [pytest.param(1, 1, id="zero1-tp1"), pytest.param(2, 2, id="zero2-tp2"),
           pytest.param(2, 1, id="zero2-tp1", marks=pytest.mark.slow),
           pytest.param(1, 2, id="zero1-tp2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("zero,tp", LAYOUTS)
def test_exact_resume(base_runs, tmp_path, zero, tp):
    """6 steps == 3 steps + resume (explicit path) + 3 steps, loss for loss."""
    base = base_runs(zero, tp)
    ref = losses(base)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    assert complete_checkpoints(os.path.join(base, "checkpoints")) == [6, 3]
    assert read_tracker(os.path.join(base, "checkpoints")) == 6
    ck = iter_dir(os.path.join(base, "checkpoints"), 3)
    meta = json.load(open(os.path.join(ck, "meta.json")))
    assert meta["step"] == 3 and meta["tensor_model_parallel_size"] == tp and meta["zero_stage"] == zero
    assert meta["consumed_tokens"] == 3 * 8 * 256
    assert os.path.isfile(os.path.join(ck, "config.yaml"))
    state = torch.load(os.path.join(ck, "trainer", "rank_00001.pt"), weights_only=True)
    assert state["step"] == 3 and state["data"]["consumed_samples"] == 3 * 8 and "rng" in state

    resumed = str(tmp_path / "resumed")
    train(resumed, f"deepspeed.zero_stage={zero}", f"parallel.tensor_model_parallel_size={tp}",
          f"checkpoint.resume={ck}")
    got = losses(resumed)
    assert sorted(got) == [4, 5, 6]
    assert_same(ref, got, [4, 5, 6])


def test_tp_change_2_to_1(base_runs, tmp_path):
    """TP 2 -> 1 (two data-parallel ranks): weights and optimizer state reshard, no flag needed,
    the losses continue as in the uninterrupted run."""
    base = base_runs(2, 2)
    ck = iter_dir(os.path.join(base, "checkpoints"), 3)
    run = str(tmp_path / "tp1")
    p = train(run, "deepspeed.zero_stage=2", f"checkpoint.resume={ck}")
    assert "OPTIMIZER STATE IS NEW" not in p.stdout and "parallel layout changed" in p.stdout
    assert_same(losses(base), losses(run), [4, 5, 6], tol=1e-4)
    meta = json.load(open(os.path.join(iter_dir(os.path.join(run, "checkpoints"), 6), "meta.json")))
    assert "fresh_optimizer_at_step" not in meta and meta["tensor_model_parallel_size"] == 1


def test_unreshardable_optimizer_needs_flag(base_runs, tmp_path):
    """A checkpoint whose optimizer state is only in DeepSpeed's per-rank files (written before
    the sharded format): another layout is refused, naming why, unless allow_fresh_optimizer."""
    ck = str(tmp_path / "old")
    shutil.copytree(iter_dir(os.path.join(base_runs(2, 2), "checkpoints"), 3), ck)
    meta = json.load(open(os.path.join(ck, "meta.json")))
    del meta["optimizer"]
    json.dump(meta, open(os.path.join(ck, "meta.json"), "w"))
    mf.write_manifest(ck, {"step": 3})
    refused = train(str(tmp_path / "refused"), "deepspeed.zero_stage=2", f"checkpoint.resume={ck}", check=False)
    assert refused.returncode != 0 and "exitcode: 2" in refused.stdout, refused.stdout[-3000:]  # config error
    assert "checkpoint.allow_fresh_optimizer=true" in refused.stdout and "older version" in refused.stdout

    run = str(tmp_path / "tp1")
    p = train(run, "deepspeed.zero_stage=2", f"checkpoint.resume={ck}", "checkpoint.allow_fresh_optimizer=true")
    assert "OPTIMIZER STATE IS NEW" in p.stdout
    ref, got = losses(base_runs(2, 2)), losses(run)
    assert abs(ref[4] - got[4]) < 1e-4  # forward before the first update: resharded weights only
    # a new Adam state changes the next steps a little; stale ZeRO fp32 weights would jump
    # back to the first steps' ~8.3
    assert got[6] < got[5] < ref[4] and all(abs(ref[s] - got[s]) < 0.15 for s in (5, 6)), (ref, got)
    meta = json.load(open(os.path.join(iter_dir(os.path.join(run, "checkpoints"), 6), "meta.json")))
    assert meta["fresh_optimizer_at_step"] == 3 and meta["tensor_model_parallel_size"] == 1


def test_sigkill_during_save_keeps_previous(base_runs, tmp_path):
    base = base_runs(1, 1)
    run = copy_run(base, str(tmp_path / "run"))
    root = os.path.join(run, "checkpoints")
    shutil.rmtree(iter_dir(root, 6))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write("3\n")
    p = train(run, env={CRASH_HOOK: "model"}, check=False)
    assert p.returncode != 0 and "killing rank 0 mid-save" in p.stdout
    assert read_tracker(root) == 3 and complete_checkpoints(root) == [3]
    assert os.path.isdir(iter_dir(root, 6) + ".tmp")  # the half-written save, never published

    train(run)  # resumes from 3, cleans up the temporary
    assert_same(losses(base), losses(run), [4, 5, 6])
    assert read_tracker(root) == 6 and complete_checkpoints(root) == [6, 3]
    assert not os.path.exists(iter_dir(root, 6) + ".tmp")


def test_corrupt_shard_falls_back(base_runs, tmp_path):
    base = base_runs(1, 1)
    run = copy_run(base, str(tmp_path / "run"))
    root = os.path.join(run, "checkpoints")
    shard = os.path.join(iter_dir(root, 6), "model", "__0_0.distcp")
    with open(shard, "r+b") as fh:  # flip bytes in the middle, size unchanged
        fh.seek(os.path.getsize(shard) // 2)
        fh.write(b"\x00\xff" * 8)
    p = train(run, "train.steps=7")
    assert "skipping corrupt checkpoint" in p.stdout and "model/__0_0.distcp: checksum mismatch" in p.stdout
    assert "resumed from" in p.stdout and "iter_0000003" in p.stdout
    got = losses(run)
    assert sorted(got) == [4, 5, 6, 7]
    assert abs(got[4] - losses(base)[4]) <= TOL  # same state at step 3; later steps: other schedule


def test_manifest_detects_damage(tmp_path):
    root = tmp_path / "ck"
    (root / "model").mkdir(parents=True)
    (root / "model" / "a.bin").write_bytes(b"x" * 1000)
    (root / "meta.json").write_text("{}")
    mf.write_manifest(str(root), {"step": 1})
    assert set(mf.verify(str(root))["files"]) == {"model/a.bin", "meta.json"}
    (root / "model" / "a.bin").write_bytes(b"x" * 999)
    with pytest.raises(mf.CheckpointCorrupt, match=r"model/a.bin: size 999 != 1000"):
        mf.verify(str(root))
    (root / "model" / "a.bin").unlink()
    with pytest.raises(mf.CheckpointCorrupt, match="model/a.bin: missing"):
        mf.verify(str(root))
    (root / mf.MANIFEST).unlink()
    with pytest.raises(mf.CheckpointCorrupt, match="no manifest.json"):
        mf.verify(str(root))


def test_keep_last_pruning(tmp_path):
    root = tmp_path / "checkpoints"

    def make(step):
        d = root / f"iter_{step:07d}"
        d.mkdir(parents=True)
        (d / mf.MANIFEST).write_text("{}")

    mgr = CheckpointManager(str(tmp_path), engine=None, model=None, keep_last=2, tp_size=1)
    for s in (1, 2, 3):
        make(s)
    (root / "iter_0000000.tmp").mkdir()  # a stale temporary of an older save
    mgr._prune(3)
    assert complete_checkpoints(str(root)) == [3, 2]
    assert not (root / "iter_0000000.tmp").exists()
    mgr = CheckpointManager(str(tmp_path), engine=None, model=None, keep_last=2, tp_size=1)
    mgr.loaded_step = 2  # resumed from 2 (3 skipped, say): 2 stays until this run saved 2 newer
    make(4)
    mgr._prune(4)
    assert complete_checkpoints(str(root)) == [4, 3, 2]
    make(5)
    mgr._prune(5)
    assert complete_checkpoints(str(root)) == [5, 4]
    mgr.keep_last = 0  # keep everything
    make(6)
    mgr._prune(6)
    assert complete_checkpoints(str(root)) == [6, 5, 4]


def test_stop_file_and_sigusr1(base_runs, tmp_path):
    """A stop request on one rank: all ranks save at the step boundary and exit 75 (requeue)."""
    run = str(tmp_path / "run")
    os.makedirs(run)
    open(os.path.join(run, "STOP"), "w").close()
    procs = spawn_ranks(run, "train.steps=50", "checkpoint.save_interval=0")
    codes = [p.wait(timeout=180) for p in procs]
    assert codes == [75, 75]
    root = os.path.join(run, "checkpoints")
    assert read_tracker(root) == 1 and not os.path.exists(os.path.join(run, "STOP"))

    procs = spawn_ranks(run, "train.steps=50", "checkpoint.save_interval=0")
    wait_for_step(run, 3, procs)
    procs[1].send_signal(signal.SIGUSR1)  # one rank only
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [75, 75]
    stopped = read_tracker(root)
    assert stopped >= 3 and complete_checkpoints(root)[0] == stopped
    stops = [r for r in records(run) if r.get("event") == "stop"]
    assert [s["step"] for s in stops] == [1, stopped]
    assert sorted(losses(run)) == list(range(1, stopped + 1))  # resumed at 2, no step lost or repeated


def test_dead_rank_fails_the_job(tmp_path):
    run = str(tmp_path / "run")
    procs = spawn_ranks(run, "train.steps=100000", "checkpoint.save_interval=0", "parallel.timeout_minutes=1")
    try:
        wait_for_step(run, 2, procs)
        procs[1].kill()
        t0 = time.monotonic()
        code = procs[0].wait(timeout=90)
        elapsed = time.monotonic() - t0
        assert code != 0 and elapsed < 75, (code, elapsed)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


# --------------------------------------------------------------------------- converter


def convert(*args):
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), *args],
                       env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:]
    return p


def test_convert_round_trip_and_train_at_tp2(base_runs, tmp_path):
    """TP=2 checkpoint -> torch (TP=1) -> ours -> torch; -> HF -> ours -> torch: identical tensors.
    The imported checkpoint trains at TP=2 and at TP=1 with the same first loss."""
    base = base_runs(2, 2)
    t1, t2, t3 = (str(tmp_path / f"{n}.pt") for n in ("a", "b", "c"))
    convert("to-torch", base, t1)
    convert("from-torch", t1, str(tmp_path / "ours"))
    convert("to-torch", str(tmp_path / "ours"), t2)
    convert("to-hf", str(tmp_path / "ours"), str(tmp_path / "hf"))
    convert("from-hf", str(tmp_path / "hf"), str(tmp_path / "ours_hf"))
    convert("to-torch", str(tmp_path / "ours_hf"), t3)
    a, b, c = (torch.load(t, weights_only=True) for t in (t1, t2, t3))
    assert a["step"] == 6 and a["config"]["parallel"]["tensor_model_parallel_size"] == 2
    for other in (b, c):
        assert sorted(other["model"]) == sorted(a["model"])
        for k, v in a["model"].items():
            assert torch.equal(v, other["model"][k]), k
    hf_cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf_cfg["model_type"] == "infini_llama" and hf_cfg["num_key_value_heads"] == 2

    first = {}
    for tp in (2, 1):
        run = str(tmp_path / f"ft{tp}")
        train(run, "train.steps=1", f"parallel.tensor_model_parallel_size={tp}",
              f"checkpoint.resume={tmp_path / 'ours_hf'}")
        first[tp] = losses(run)[1]
    assert abs(first[1] - first[2]) < 1e-4
    assert first[1] < losses(base)[1] - 0.3  # trained weights, not a fresh init


def _hf_logits_check(rank, world_size):
    """In a spawned process (Megatron groups at TP=1): our model vs LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_infini.checkpointing.convert import hf_config, megatron_to_hf
    from megatron_infini.training.config import Config, to_dict
    from megatron_infini.training.model import build_model

    torch.manual_seed(0)
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 2, 64, 4
    cfg.model.num_query_groups, cfg.model.memory_enabled, cfg.model.segment_length = 2, False, 32
    cfg.train.seq_length = 32
    vocab = 256
    model = build_model(cfg, vocab).eval()
    with torch.no_grad():  # non-trivial norms
        for n, p in model.named_parameters():
            if "layernorm" in n:
                p.uniform_(0.5, 1.5)
    tokens = torch.randint(0, vocab, (2, 32))
    pos = torch.arange(32).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        ours = model(tokens, pos, None)  # [b, s, V]
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hc = hf_config(to_dict(cfg), vocab)
    hc = {k: v for k, v in hc.items() if k not in ("infini_attention", "megatron_infini_config")}
    llama = LlamaForCausalLM(LlamaConfig(**hc)).eval()
    missing, unexpected = llama.load_state_dict(megatron_to_hf(sd, to_dict(cfg)["model"]), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        theirs = llama(tokens).logits
    return float((ours - theirs).abs().max())


def test_hf_logits_match_llama():
    pytest.importorskip("transformers")
    from _dist import run_distributed

    (diff,) = run_distributed(_hf_logits_check, 1, tp=1)
    assert diff < 1e-4, diff
