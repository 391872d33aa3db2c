#!/usr/bin/env python3
"""One GPU validation run (at most ~8 minutes on one H100/H200) ending in one summary table.

Stages, each in its own process with a time limit taken from what is left of the budget; a
stage that would not fit in GPU memory (launch/memory.py's estimate against the device) or in
the time left is skipped with the reason in the table:

  tests    pytest -m gpu (fused attention kernels without the math fallback, ...)
  op       the op in bf16, forward+backward, against SDPA's flash full causal attention at 8K,
           32K and 128K tokens (tools/bench_attention.py): times, ratio, share of peak
  train    the 1B preset (configs/llama-1b-infini.yaml, 128K vocabulary) for 10 steps at 4K and
           32K tokens, ZeRO-1 on one GPU: tokens/s, MFU (megatron_infini/flops.py's count),
           peak memory against launch/memory.py's estimate
  resume   the debug model: 4 steps straight against 2 steps + save + resume to 4 (loss diff)
  stream   streaming prefill of 1M tokens through the 1B model (bf16, random weights):
           tokens/s, peak memory

    bash tools/gpu_check.sh [--budget-s 480] [--out DIR] [--only op,train]
    python tools/gpu_check.py --dry-run        # print the plan, run nothing (works on CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
STAGES = ("tests", "op", "train", "resume", "stream")
#: Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device name; else the measured matmul rate.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
               "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0}
LLAMA_1B = os.path.join(REPO, "configs", "llama-1b-infini.yaml")
VOCAB = 128256  # Llama 3's vocabulary, so the output layer has its real size
ENV = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")


def nominal_peak(name: str):
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


class Runner:
    def __init__(self, budget_s: float, out: str, dry_run: bool):
        self.deadline = time.monotonic() + budget_s
        self.out, self.dry_run = out, dry_run
        self.rows = []  # (stage, what, result)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd, cap_s: float, need_s: float = 20.0):
        """Run cmd (logged to OUT/name.log) with a limit of min(cap, time left); None when skipped."""
        log = os.path.join(self.out, f"{name}.log")
        if self.dry_run:
            print(f"[gpu_check] {name}: {' '.join(cmd)}  (limit {cap_s:.0f} s)")
            return None
        if self.left() < need_s:
            self.rows.append((name, "skipped", f"not enough time left ({self.left():.0f} s)"))
            return None
        limit = max(1.0, min(cap_s, self.left()))
        t0 = time.monotonic()
        with open(log, "w") as fh:
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=ENV, stdout=fh, stderr=subprocess.STDOUT, timeout=limit)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        print(f"[gpu_check] {name}: exit {code} after {time.monotonic() - t0:.0f} s (log {log})", flush=True)
        return code

    def add(self, stage: str, what: str, result: str) -> None:
        self.rows.append((stage, what, result))


def stage_tests(r: Runner) -> None:
    code = r.run("tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           "tests/"], cap_s=120)
    if code is None:
        return
    tail = open(os.path.join(r.out, "tests.log")).read().strip().splitlines()
    summary = next((l for l in reversed(tail) if " passed" in l or " failed" in l or " error" in l), "no summary")
    r.add("tests", "pytest -m gpu", ("PASS " if code == 0 else "FAIL ") + summary.strip("= "))


def stage_op(r: Runner, peak) -> None:
    js = os.path.join(r.out, "op.json")
    code = r.run("op", [sys.executable, "tools/bench_attention.py", "--device", "cuda", "--dtype", "bf16",
                        "--impls", "fast,full", "--lengths", "8192,32768,131072", "--updates", "linear,delta",
                        "--heads", "32", "--kv-heads", "8", "--head-dim", "64", "--segment", "2048",
                        "--repeats", "5", "--budget-s", "40", "--json", js], cap_s=180)
    if code is None:
        return
    if code != 0 or not os.path.exists(js):
        r.add("op", "bench_attention (bf16, 32 q / 8 kv heads, d 64, segment 2048)", f"FAILED ({code})")
        return
    data = json.load(open(js))
    rate = peak or data["matmul_flops_per_s"]
    for s in sorted({x["s"] for x in data["results"]}):
        full = next((x for x in data["results"] if x["s"] == s and x["impl"] == "full"), None)
        for x in (x for x in data["results"] if x["s"] == s and x["impl"] == "fast"):
            ratio = statistics.median(f / t for f, t in zip(full["times_s"], x["times_s"])) if full else None
            r.add("op", f"{s // 1024}K {x['update']}: fast / flash full causal (fwd+bwd)",
                  f"{x['time_s'] * 1e3:.1f} ms vs {full['time_s'] * 1e3:.1f} ms: full / fast = {ratio:.1f}x; "
                  f"{100 * x['flops_per_s'] / rate:.0f}% vs {100 * full['flops_per_s'] / rate:.0f}% of peak"
                  if full else f"{x['time_s'] * 1e3:.1f} ms (full attention missing)")


def _train_cmd(run_dir: str, seq: int, micro: int, *extra: str):
    return [sys.executable, "-m", "megatron_infini.train", "--config", LLAMA_1B, f"run_dir={run_dir}",
            "train.steps=10", f"train.seq_length={seq}", f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro}", "train.eval_interval=0", f"model.vocab_size={VOCAB}",
            "optimizer.warmup_steps=2", "checkpoint.save_at_end=false", "checkpoint.save_interval=0",
            "logging.wandb_mode=disabled", "logging.progress_bar=false", "data.train_data=", "data.valid_data=",
            "data.tokenizer=", *extra]


def _metrics(run_dir: str):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path) if l.strip() and json.loads(l).get("kind") != "event"]


def _oom(r: Runner, name: str) -> bool:
    path = os.path.join(r.out, f"{name}.log")
    return os.path.exists(path) and "out of memory" in open(path, errors="replace").read().lower()


def stage_train(r: Runner, peak, gpu_gib: float) -> None:
    """10 steps per length; a run that runs out of GPU memory is retried once with full layer
    recomputation, and reported as not fitting when that fails too."""
    from launch.memory import estimate_memory_gb
    from megatron_infini.training.config import load_config

    for seq, micro in ((4096, 4), (32768, 1)):
        what = f"1B preset, {seq // 1024}K tokens x micro batch {micro}, ZeRO-1, 10 steps"
        for recompute in (False, True):
            cfg = load_config(LLAMA_1B, [f"model.vocab_size={VOCAB}", f"train.seq_length={seq}",
                                         f"model.recompute_layers={str(recompute).lower()}"])
            est = estimate_memory_gb(cfg.model, cfg.parallel, 1, micro, seq, 1, "bf16")
            name = f"train_{seq // 1024}k" + ("_recompute" if recompute else "")
            run_dir = os.path.join(r.out, name)
            code = r.run(name, _train_cmd(run_dir, seq, micro, f"model.recompute_layers={str(recompute).lower()}"),
                         cap_s=150, need_s=60)
            if code is None or code == 0 or not _oom(r, name) or recompute:
                break
        if code is None:
            continue
        steps = _metrics(run_dir)
        if code != 0 or len(steps) < 4:
            why = f"does not fit in {gpu_gib:.0f} GiB (CUDA out of memory, also with full recompute)" if _oom(r, name) \
                else f"FAILED ({code}), {len(steps)} steps logged"
            r.add("train", what, f"{why}; estimate {est:.1f} GiB")
            continue
        late = steps[3:]  # steps 4..10: past compilation and allocator warm-up
        tps = statistics.median(s["tokens_per_s"] for s in late)
        tflops = statistics.median(s["tflops_per_gpu"] for s in late)
        mfu = f"MFU {100 * tflops * 1e12 / peak:.1f}%" if peak else f"{tflops:.0f} TFLOP/s (peak unknown)"
        mem = max(s["peak_mem_gb"] for s in steps)
        setup = [l.split("[train] ", 1)[1].strip() for l in open(os.path.join(r.out, f"{name}.log"), errors="replace")
                 if "[train] precision" in l]
        what += f" [{setup[0]}]" if setup else ""
        r.add("train", what + (" (full recompute: OOM without)" if recompute else ""),
              f"{tps:,.0f} tokens/s, {tflops:.0f} TFLOP/s, {mfu}; peak {mem:.1f} GiB (estimate {est:.1f}); "
              f"loss {steps[0]['loss']:.2f} -> {steps[-1]['loss']:.2f}")


def stage_resume(r: Runner) -> None:
    debug = os.path.join(REPO, "configs", "debug.yaml")
    base = [sys.executable, "-m", "megatron_infini.train", "--config", debug, "logging.progress_bar=false",
            "train.eval_interval=0", "deepspeed.zero_stage=1"]
    straight, cut = os.path.join(r.out, "resume_straight"), os.path.join(r.out, "resume_cut")
    for name, cmd in (("resume_straight", base + [f"run_dir={straight}", "train.steps=4", "checkpoint.save_at_end=false"]),
                      ("resume_first", base + [f"run_dir={cut}", "train.steps=2"]),
                      ("resume_second", base + [f"run_dir={cut}", "train.steps=4"])):
        code = r.run(name, cmd, cap_s=120, need_s=30)
        if code is None:
            return
        if code != 0:
            r.add("resume", "debug model: 2 steps + save + resume to 4", f"FAILED in {name} ({code})")
            return
    a, b = _metrics(straight), _metrics(cut)
    if len(a) != 4 or len(b) != 4 or [s["step"] for s in b] != [1, 2, 3, 4]:
        r.add("resume", "debug model: 2 steps + save + resume to 4", f"FAILED: steps {[s['step'] for s in b]}")
        return
    diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    r.add("resume", "debug model (bf16, ZeRO-1): 4 steps vs 2 + save + resume",
          f"{'PASS' if diff < 1e-2 else 'CHECK'}: max |loss diff| {diff:.2e} over steps 1-4")


def stage_stream(r: Runner) -> None:
    js = os.path.join(r.out, "stream.json")
    code = r.run("stream", [sys.executable, os.path.abspath(__file__), "--stream-worker", js], cap_s=150, need_s=60)
    if code is None:
        return
    if code != 0 or not os.path.exists(js):
        r.add("stream", "1B streaming prefill of 1M tokens", f"FAILED ({code})")
        return
    d = json.load(open(js))
    r.add("stream", f"1B streaming prefill of {d['tokens']:,} tokens (bf16, chunks of {d['chunk']} tokens)",
          f"{d['tokens_per_s']:,.0f} tokens/s, {d['seconds']:.1f} s; peak {d['peak_gib']:.1f} GiB "
          f"(memory state {d['memory_mib']:.1f} MiB)")


def stream_worker(out_path: str, tokens: int = 1 << 20) -> None:
    """Random-weight 1B model in bf16, streamed 1M random tokens (StreamingLM)."""
    import torch

    from megatron_infini.inference.loader import inference_session
    from megatron_infini.inference.stream import StreamingLM, memory_numbers
    from megatron_infini.training.config import load_config
    from megatron_infini.training.model import build_model

    with inference_session():
        cfg = load_config(LLAMA_1B, [f"model.vocab_size={VOCAB}"])
        model = build_model(cfg, VOCAB, bf16=True).eval()
        lm = StreamingLM(model, chunk_segments=16)
        g = torch.Generator().manual_seed(0)
        pieces = (torch.randint(0, VOCAB, (1, lm.chunk), generator=g) for _ in range(tokens // lm.chunk))
        lm.feed(torch.randint(0, VOCAB, (1, lm.chunk), generator=g))  # warm-up (not counted)
        lm.reset()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        lm.feed(pieces)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        json.dump(dict(tokens=tokens, chunk=lm.chunk, seconds=dt, tokens_per_s=tokens / dt,
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                       memory_mib=memory_numbers(model) * 4 / 2**20), open(out_path, "w"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=470.0, help="wall-clock budget of all stages (default 470)")
    p.add_argument("--out", default=None, help="directory for logs and JSON (default: a new temporary one)")
    p.add_argument("--only", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    p.add_argument("--dry-run", action="store_true", help="print the plan and run nothing (no GPU needed)")
    p.add_argument("--stream-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.stream_worker:
        stream_worker(a.stream_worker)
        return 0
    stages = [s for s in a.only.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"--only: unknown stage(s) {bad}; choose from {STAGES}")
    import torch

    if not torch.cuda.is_available() and not a.dry_run:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing to check")
        return 0
    out = a.out or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(out, exist_ok=True)
    r = Runner(a.budget_s, out, a.dry_run)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        name, gpu_gib = "no GPU (dry run)", 80.0
    peak = nominal_peak(name)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.monotonic()
    for stage in stages:
        if stage == "tests":
            stage_tests(r)
        elif stage == "op":
            stage_op(r, peak)
        elif stage == "train":
            stage_train(r, peak, gpu_gib)
        elif stage == "resume":
            stage_resume(r)
        elif stage == "stream":
            stage_stream(r)
    if a.dry_run:
        return 0
    print(f"\n## gpu_check: {name} ({gpu_gib:.0f} GiB), torch {torch.__version__}, {started}, "
          f"{time.monotonic() - t0:.0f} s; peak {'%.0f TFLOP/s bf16 dense' % (peak / 1e12) if peak else 'unknown'}\n")
    print("| stage | what | result |\n|---|---|---|")
    for stage, what, result in r.rows:
        print(f"| {stage} | {what} | {result} |")
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(dict(device=name, started=started, rows=r.rows), fh, indent=1)
    print(f"\nlogs and JSON in {out}")
    return 0 if not any(x[2].startswith(("FAIL", "FAILED")) for x in r.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
