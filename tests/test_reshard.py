"""Resume on another parallel layout: weights and optimizer state reshard, training continues as
if uninterrupted. CPU, gloo, fp32, the debug model.

- 8 steps straight at layout A (checkpoint at step 4) vs resume from that checkpoint at layout
  B for 4 more steps: same losses within 1e-4 (DP 2->1 and 1->2 with ZeRO 1 and 2, TP 2->1
  and 1->2, CP 2->1, ZeRO 0 -> 1, ZeRO 3 -> 1; the first in the default suite, the rest `slow`;
  TP 2 -> 1 also in the default suite, tests/test_checkpoint.py). The default case's
  checkpoint is written in the background (checkpoint.async_save).
- Adam moments, step and weights after a reshard (DP 2 ZeRO-1 -> TP 2 ZeRO-2, -> ZeRO 0, -> ZeRO-3),
  gathered to full tensors, equal those before (in-process, two ranks).
- A checkpoint of another model shape or memory type: one error naming the fields, exit 2.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _dist import reinit_model_parallel, run_distributed
from train_utils import read_metrics, train

TOL = 1e-4


def _layout_args(nproc, tp, cp, zero):
    return dict(nproc=nproc), [f"parallel.tensor_model_parallel_size={tp}", f"parallel.context_parallel_size={cp}",
                               f"deepspeed.zero_stage={zero}"]


COMMON = ["train.eval_interval=0", "logging.wandb_mode=disabled"]
_SOURCES = {}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """8 steps at a layout (nproc, tp, cp, zero), checkpoint at 4: built once per layout."""
    root = tmp_path_factory.mktemp("reshard")

    def get(layout):
        if layout not in _SOURCES:
            kw, args = _layout_args(*layout)
            # periodic saves in the background where the default suite reads them (DP 2, ZeRO-2)
            background = f"checkpoint.async_save={layout == (2, 1, 1, 2)}".lower()
            run = train(root / ("src_%d_%d_%d_%d" % layout), *COMMON, *args, "train.steps=8", background,
                        "checkpoint.save_interval=4", "checkpoint.keep_last=0", **kw)
            assert run.returncode == 0, run.output[-3000:]
            _SOURCES[layout] = run
        return _SOURCES[layout]

    yield get
    _SOURCES.clear()


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


#            id               source (nproc, tp, cp, zero)   target
CASES = [
    pytest.param((2, 1, 1, 2), (1, 1, 1, 2), id="dp2to1-zero2"),
    pytest.param((2, 1, 1, 1), (1, 1, 1, 1), id="dp2to1-zero1", marks=pytest.mark.slow),
    pytest.param((1, 1, 1, 1), (2, 1, 1, 1), id="dp1to2-zero1", marks=pytest.mark.slow),
    pytest.param((1, 1, 1, 2), (2, 1, 1, 2), id="dp1to2-zero2", marks=pytest.mark.slow),
    pytest.param((2, 2, 1, 1), (1, 1, 1, 1), id="tp2to1", marks=pytest.mark.slow),
    pytest.param((1, 1, 1, 1), (2, 2, 1, 2), id="tp1to2", marks=pytest.mark.slow),
    pytest.param((2, 1, 2, 1), (1, 1, 1, 1), id="cp2to1", marks=pytest.mark.slow),
    pytest.param((1, 1, 1, 0), (2, 1, 1, 1), id="zero0-dp1to2-zero1", marks=pytest.mark.slow),
    pytest.param((2, 1, 1, 3), (1, 1, 1, 1), id="zero3-dp2to1-zero1", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("src,dst", CASES)
def test_resume_on_another_layout(source_run, tmp_path, src, dst):
    base = source_run(src)
    ref = _losses(base.run_dir)
    assert sorted(ref) == list(range(1, 9))
    ck = os.path.join(base.run_dir, "checkpoints", "iter_0000004")
    meta = json.load(open(os.path.join(ck, "meta.json")))
    assert meta["optimizer"]["format"] == "sharded" and meta["optimizer"]["step"] == 4
    assert not os.path.exists(os.path.join(ck, "deepspeed"))  # weights stored once
    kw, args = _layout_args(*dst)
    run = train(tmp_path / "resumed", *COMMON, *args, "train.steps=8", "checkpoint.save_interval=0",
                f"checkpoint.resume={ck}", **kw)
    assert run.returncode == 0, run.output[-3000:]
    assert "OPTIMIZER STATE IS NEW" not in run.output
    got = _losses(run.run_dir)
    assert sorted(got) == [5, 6, 7, 8]
    diffs = {s: abs(ref[s] - got[s]) for s in got}
    assert max(diffs.values()) <= TOL, (diffs, ref, got)


def test_other_model_is_refused(source_run, tmp_path):
    """Another hidden size and memory type: one error naming both, exit 2, before any step."""
    ck = os.path.join(source_run((2, 1, 1, 2)).run_dir, "checkpoints", "iter_0000004")
    run = train(tmp_path / "other", *COMMON, "train.steps=8", "model.hidden_size=32", "model.memory_update=delta",
                f"checkpoint.resume={ck}", nproc=0)
    assert run.returncode == 2, run.output[-3000:]
    line = next(ln for ln in run.output.splitlines() if "error:" in ln)
    assert "holds another model" in line and "hidden_size: checkpoint 64, this run 32" in line, line
    assert "memory_update: checkpoint 'linear', this run 'delta'" in line, line
    assert not _losses(run.run_dir)


# --------------------------------------------------------------------------- moments, in-process


def _full_tp(t, name, p):
    """Gather a tensor-parallel parameter's tensor to its full TP=1 shape."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    dim = p.partition_dim
    # SwiGLU fc1 holds [gate_r; up_r] on rank r: two chunks per rank
    stride = 2 if name.endswith("linear_fc1.weight") else p.partition_stride
    chunks = [part.chunk(stride, dim=dim) for part in parts]
    return torch.cat([chunks[r][j] for j in range(stride) for r in range(tp)], dim=dim)


def _snapshot(engine, model):
    from deepspeed.utils import safe_get_full_optimizer_state

    from megatron_infini.checkpointing import optimizer_state as ost

    import contextlib

    import deepspeed

    kind, out = ost.kind(engine), {}
    if kind == "fragments":
        ost.link_fragments(engine)  # DeepSpeed 0.19 links only the first group's state
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params) if kind == "zero3" else contextlib.nullcontext():
        for name, p in model.named_parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                t = engine.basic_optimizer.state[p][key] if kind == "plain" else safe_get_full_optimizer_state(p, key)
                out[f"{key}.{name}"] = _full_tp(t.reshape(p.shape), name, p)
            out[f"weight.{name}"] = _full_tp(p.detach(), name, p)
    return out, ost.get_step(engine)


def _build(tp, zero, world):
    from megatron_infini.training.config import load_config
    from megatron_infini.training.engine import build_engine
    from megatron_infini.training.model import build_model

    from train_utils import DEBUG_CONFIG

    cfg = load_config(DEBUG_CONFIG)
    cfg.parallel.tensor_model_parallel_size, cfg.deepspeed.zero_stage = tp, zero
    torch.manual_seed(1234)
    model = build_model(cfg, 512)
    engine, _ = build_engine(model, cfg, world // tp)
    return model, engine


def _moments_check(rank, world, run_dir):
    import torch.distributed as dist

    from megatron_infini.checkpointing import CheckpointManager

    os.environ.setdefault("LOCAL_RANK", str(rank))
    model, engine = _build(1, 1, world)  # DP 2, ZeRO-1
    g = torch.Generator().manual_seed(rank)
    for _ in range(4):  # 2 optimizer steps (2 micro batches per step and rank)
        x = torch.randint(0, 512, (2, 128), generator=g)
        pos = torch.arange(128).unsqueeze(0).expand_as(x)
        engine.backward(engine(x, pos, None, labels=x).float().mean())
        engine.step()
    before, step = _snapshot(engine, model)
    assert step == 2
    CheckpointManager(run_dir, engine, model, keep_last=0, tp_size=1).save(2, {"step": 2}, {})
    dist.barrier()

    results = {}
    # TP 2 x DP 1 with ZeRO-2; DP 2 with a plain torch optimizer; DP 2 with ZeRO-3
    for tp, zero in ((2, 2), (1, 0), (1, 3)):
        reinit_model_parallel(tp)
        model, engine = _build(tp, zero, world)
        CheckpointManager(run_dir, engine, model, keep_last=0, tp_size=tp).load("auto", False)
        after, step_after = _snapshot(engine, model)
        assert step_after == step == 2, (step_after, step)
        assert after.keys() == before.keys()
        results[(tp, zero)] = max(float((after[k] - before[k]).abs().max()) for k in before)
        nonzero = min(float(before[k].abs().max()) for k in before if k.startswith("exp_avg_sq"))
        assert nonzero > 0  # moments were really there to compare
    return results


def test_adam_moments_survive_reshard(tmp_path):
    results = run_distributed(_moments_check, 2, str(tmp_path / "run"), tp=1)
    for r in results:
        for layout, diff in r.items():
            assert diff == 0.0, (layout, diff)
