"""Stages of tools/gpu_check.py that run the real trainer (`megatron_infini.train`, one process or
torchrun): 1B throughput against local attention only, Inductor compile against eager, several GPUs
against one, save + resume. Each run's limit comes from what is left of the stage's cap; numbers
come from the runs' metrics.jsonl. `ctx.smoke`: the debug model on CPU (gloo for 2 ranks).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import List, Optional

from gpu_stages import LLAMA_1B, REPO, VOCAB, StageContext, StageSkipped, length

DEBUG = os.path.join(REPO, "configs", "debug.yaml")
#: Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device name, for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0}
COMMON = ["train.eval_interval=0", "checkpoint.save_interval=0", "checkpoint.save_at_end=false",
          "checkpoint.resume=none", "logging.wandb_mode=disabled", "logging.progress_bar=false"]


def train_run(ctx: StageContext, name: str, overrides: List[str], nproc: int = 1, config: str = DEBUG,
              limit: Optional[float] = None) -> dict:
    """One trainer run in ctx.stage_dir/name, under `limit` seconds (default: all that is left).
    Returns dict(code, steps, log)."""
    run_dir = os.path.join(ctx.stage_dir, name)
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    else:  # one plain process (no rendezvous to set up)
        launch = [sys.executable]
    cmd = launch + ["-m", "megatron_infini.train", "--config", config, f"run_dir={run_dir}", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    if ctx.smoke:
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    log = os.path.join(ctx.stage_dir, f"{name}.log")
    limit = max(1.0, min(limit or ctx.left(), ctx.left()) - 2)
    with open(log, "w") as fh:
        try:
            code = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    path = os.path.join(run_dir, "metrics.jsonl")
    steps = [json.loads(l) for l in open(path) if '"loss"' in l] if os.path.exists(path) else []
    if steps:
        ctx.note_peak(max(s.get("peak_mem_gb", 0.0) for s in steps))  # GPU: max_memory_allocated of rank 0
    return dict(code=code, steps=steps, log=log, limit=limit)


def _failed(run: dict) -> Optional[str]:
    if run["code"] == 0 and run["steps"]:
        return None
    tail = open(run["log"], errors="replace").read().strip().splitlines()[-3:]
    what = f"timed out after {run['limit']:.0f} s" if run["code"] == "timeout" else f"exit {run['code']}"
    return f"FAILED ({what}, {len(run['steps'])} steps): {' / '.join(tail)[-400:]}"


def late(steps: List[dict], key: str, skip: int = 2) -> float:
    """Median of `key` over the steps after `skip` warm-up steps (compilation, allocator)."""
    return statistics.median(s[key] for s in steps[skip:] if key in s)


def nominal_peak() -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((t * 1e12 for k, t in PEAK_TFLOPS.items() if k in name), None)


def max_loss_diff(a: List[dict], b: List[dict]) -> float:
    if [s["step"] for s in a] != [s["step"] for s in b]:
        return float("inf")
    return max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- train
def stage_train(ctx: StageContext) -> None:
    """The 1B preset with Llama 3's vocabulary at 32K tokens, ZeRO-1 on one GPU, 8 steps: Infini
    against the same model with the memory off (model.memory_enabled=false: segment-local attention
    only, same segments); tokens/s, MFU, peak memory, and their ratio."""
    if ctx.smoke:
        config, seq, steps, extra = DEBUG, 256, 4, []
    else:  # the shipped corpus (its 4K-token tokenizer) into the real 128K-row embedding
        config, seq, steps = LLAMA_1B, 32768, 8
        extra = [f"model.vocab_size={VOCAB}", "data.train_data=", "data.valid_data=", "data.tokenizer="]
    base = COMMON + extra + [f"train.steps={steps}", f"train.seq_length={seq}", "train.micro_batch_size=1",
                             "train.global_batch_size=1", "optimizer.warmup_steps=2", "deepspeed.zero_stage=1"]
    recompute = not ctx.smoke and needs_recompute(config, base, seq)  # only where the estimate does not fit
    base.append(f"model.recompute_layers={str(recompute).lower()}")
    peak = nominal_peak()
    got = {}
    for variant, more, share in (("infini", [], 0.55), ("local", ["model.memory_enabled=false"], 1.0)):
        what = f"{'debug' if ctx.smoke else '1B'} model, {length(seq)} tokens, " \
               f"{'Infini' if variant == 'infini' else 'local attention only (memory off)'}" \
               + (" (full layer recompute: estimate above 90% of the GPU)" if recompute else "")
        run = train_run(ctx, variant, base + more, config=config, limit=ctx.left() * share)
        why = _failed(run)
        if why:
            ctx.row(what, why, ok=False)
            continue
        tps, tfl = late(run["steps"], "tokens_per_s"), late(run["steps"], "tflops_per_gpu")
        mem = max(s["peak_mem_gb"] for s in run["steps"])
        got[variant] = tps
        mfu = f"MFU {100 * tfl * 1e12 / peak:.1f}%" if peak else f"{tfl * 1e3:.2f} GFLOP/s"
        ctx.row(what, f"{tps:,.0f} tokens/s, {mfu}, peak {mem:.1f} GiB; loss {run['steps'][0]['loss']:.2f} -> "
                f"{run['steps'][-1]['loss']:.2f}", ok=True, variant=variant, tokens_per_s=tps, tflops=tfl,
                peak_gib=mem, steps=len(run["steps"]))
    if len(got) == 2:
        ctx.row("Infini / local only (tokens/s)", f"{got['infini'] / got['local']:.2f}x",
                ratio=got["infini"] / got["local"])


def needs_recompute(config: str, overrides: List[str], seq: int, gpu_gib: Optional[float] = None) -> bool:
    """launch/memory.py's estimate (bf16, ZeRO-1, micro batch 1) above 90% of the GPU's memory
    (`gpu_gib`, default: device 0's)."""
    from launch.memory import estimate_memory_gb
    from megatron_infini.training.config import load_config

    if gpu_gib is None:
        import torch

        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    cfg = load_config(config, [o for o in overrides if o.startswith("model.")])
    return estimate_memory_gb(cfg.model, cfg.parallel, 1, 1, seq, 1, "bf16") > 0.9 * gpu_gib


# ----------------------------------------------------------------------------- compile
#: Loss difference allowed between the compiled and the eager run (bf16 on GPU: fused kernels
#: round differently; fp32 on CPU).
COMPILE_TOL = dict(gpu=3e-2, cpu=1e-3)


def stage_compile(ctx: StageContext) -> None:
    """train.compile=true (Inductor, every transformer layer) against eager, same seed and data:
    per-step losses within COMPILE_TOL, median time per step after warm-up, and the first step's
    extra time (compilation)."""
    if ctx.smoke:
        model = ["model.num_layers=1", "model.hidden_size=32", "train.seq_length=128"]
        steps = 3
    else:
        model = ["model.num_layers=2", "model.hidden_size=1024", "model.num_attention_heads=16",
                 "model.num_query_groups=4", "model.segment_length=1024", "train.seq_length=8192"]
        steps = 8
    base = COMMON + model + [f"train.steps={steps}", "train.micro_batch_size=1", "train.global_batch_size=1",
                             "deepspeed.zero_stage=1"]
    runs = {}
    for variant, more, share in (("eager", [], 0.35), ("compiled", ["train.compile=true"], 1.0)):
        run = train_run(ctx, variant, base + more, limit=ctx.left() * share)
        why = _failed(run)
        if why:
            ctx.row(f"{variant} training", why, ok=False)
            return
        runs[variant] = run["steps"]
    eager, comp = runs["eager"], runs["compiled"]
    diff = max_loss_diff(eager, comp)
    tol = COMPILE_TOL["cpu" if ctx.smoke else "gpu"]
    t_e, t_c = late(eager, "step_time_s"), late(comp, "step_time_s")
    tps = late(comp, "tokens_per_s")
    ctx.row(f"train.compile=true vs eager ({steps} steps, {'debug' if ctx.smoke else '2 x 1024, 8K tokens'})",
            f"max |loss diff| {diff:.1e} (tol {tol:.0e}); step {t_c * 1e3:.0f} ms compiled vs {t_e * 1e3:.0f} ms eager "
            f"({t_e / t_c:.2f}x, {tps:,.0f} tokens/s); first step {comp[0]['step_time_s']:.1f} s vs "
            f"{eager[0]['step_time_s']:.1f} s",
            ok=diff <= tol, loss_diff=diff, step_s=t_c, tokens_per_s=tps, eager_step_s=t_e, speedup=t_e / t_c,
            first_step_s=comp[0]["step_time_s"], eager_first_step_s=eager[0]["step_time_s"])


# ----------------------------------------------------------------------------- several GPUs
#: Parallel layouts against one GPU; the global batch (2 sequences) is the same in every run.
LAYOUTS = (
    ("tp2_sp", "TP=2 + sequence parallel", ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                                            "deepspeed.zero_stage=0"]),
    ("cp2", "CP=2 (memory relay)", ["parallel.context_parallel_size=2", "deepspeed.zero_stage=0"]),
    ("dp2_zero1", "ZeRO-1 over DP=2", ["deepspeed.zero_stage=1"]),
)
MULTI_TOL = dict(rel=2e-3, abs=2e-3)
"""fp32 runs: the layouts sum in another order, nothing else differs."""


def stage_multigpu(ctx: StageContext) -> None:
    """torchrun with 2 ranks (nccl on GPU, gloo in smoke mode) per layout, against the same model
    on one rank: per-step losses within MULTI_TOL, tokens/s."""
    import torch

    if not ctx.smoke and torch.cuda.device_count() < 2:
        raise StageSkipped(f"{torch.cuda.device_count()} GPU visible, needs 2")
    if ctx.smoke:
        model = ["train.seq_length=256"]
    else:
        model = ["model.num_layers=4", "model.hidden_size=1024", "model.num_attention_heads=16",
                 "model.num_query_groups=4", "model.segment_length=1024", "train.seq_length=8192"]
    base = COMMON + model + ["train.steps=4", "train.micro_batch_size=1", "train.global_batch_size=2",
                             "deepspeed.precision=fp32"]
    ref = train_run(ctx, "one_rank", base + ["deepspeed.zero_stage=0"], limit=ctx.left() / 4)
    why = _failed(ref)
    if why:
        ctx.row("one rank (reference)", why, ok=False)
        return
    ref_tps = late(ref["steps"], "tokens_per_s", skip=1)
    ctx.row("one rank (reference)", f"{ref_tps:,.0f} tokens/s; losses {[round(s['loss'], 4) for s in ref['steps']]}",
            tokens_per_s=ref_tps)
    for i, (name, what, layout) in enumerate(LAYOUTS):
        run = train_run(ctx, name, base + layout, nproc=2, limit=ctx.left() / (len(LAYOUTS) - i))
        why = _failed(run)
        if why:
            ctx.row(what, why, ok=False)
            continue
        diff = max_loss_diff(ref["steps"], run["steps"])
        scale = max(abs(s["loss"]) for s in ref["steps"])
        ok = diff <= MULTI_TOL["abs"] + MULTI_TOL["rel"] * scale
        tps = late(run["steps"], "tokens_per_s", skip=1)
        ctx.row(what, f"max |loss diff| vs one rank {diff:.1e}; {tps:,.0f} tokens/s ({tps / ref_tps:.2f}x one rank)",
                ok=ok, loss_diff=diff, tokens_per_s=tps, speedup=tps / ref_tps)


# ----------------------------------------------------------------------------- resume
def stage_resume(ctx: StageContext) -> None:
    """The debug model: 4 steps straight against 2 steps + save + resume to 4 (losses)."""
    base = ["train.eval_interval=0", "logging.progress_bar=false", "deepspeed.zero_stage=1",
            "logging.wandb_mode=disabled"]
    straight = train_run(ctx, "straight", base + ["train.steps=4", "checkpoint.save_at_end=false"],
                         limit=ctx.left() / 3)
    first = train_run(ctx, "cut", base + ["train.steps=2"], limit=ctx.left() / 2)
    second = train_run(ctx, "cut", base + ["train.steps=4"])
    for run in (straight, first, second):
        why = _failed(run)
        if why:
            ctx.row("4 steps vs 2 + save + resume", why, ok=False)
            return
    steps = second["steps"]  # metrics.jsonl of the cut run holds steps 1-4
    diff = max_loss_diff(straight["steps"], steps)
    ctx.row("debug model: 4 steps vs 2 + save + resume", f"max |loss diff| {diff:.1e} over steps "
            f"{[s['step'] for s in steps]}", ok=diff < 1e-2, loss_diff=diff)
