#!/usr/bin/env python3
"""Training throughput of the Infini model against the same model with plain causal attention.

Runs the real trainer (torchrun, DeepSpeed, the config's parallel layout) once per
(sequence length, attention) case and reports the median tokens/s and TFLOP/s per rank of
the steps after warm-up, read from each run's metrics.jsonl. "causal" is the same model with
the memory off and one segment spanning the whole input: ordinary causal attention.

    python tools/bench_train.py                                    # debug model, CPU
    python tools/bench_train.py --config configs/llama-1b-infini.yaml --nproc 8 \\
        --lengths 4096,32768,131072 model.num_layers=4             # on a GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_case(config, nproc, seq, variant, steps, overrides, workdir):
    run_dir = os.path.join(workdir, f"{variant}-{seq}")
    case = [f"train.seq_length={seq}", f"train.steps={steps}", "train.eval_interval=0",
            "train.micro_batch_size=1", f"train.global_batch_size={nproc}", "optimizer.warmup_steps=0",
            "checkpoint.save_interval=0", "checkpoint.save_at_end=false", "checkpoint.resume=none",
            "logging.wandb_mode=disabled", "logging.progress_bar=false", "train.require_whole_segments=false"]
    if variant == "causal":
        case += ["model.memory_enabled=false", f"model.segment_length={seq}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "megatron_infini.train", "--config", config, f"run_dir={run_dir}", *case, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        raise SystemExit(f"{variant} at {seq} failed (exit {proc.returncode}):\n{tail}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        steps_ = [json.loads(l) for l in fh if '"loss"' in l]
    measured = steps_[min(2, len(steps_) - 1):]  # drop warm-up steps
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in measured),
        "tflops_per_gpu": statistics.median(r["tflops_per_gpu"] for r in measured),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in measured),
        "steps": len(measured),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "debug.yaml"))
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun --nproc-per-node)")
    p.add_argument("--lengths", default="256,1024,4096")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--variants", default="infini,causal")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="config overrides for every case, e.g. model.num_layers=4")
    a = p.parse_args(argv)
    lengths = [int(x) for x in a.lengths.split(",")]
    variants = a.variants.split(",")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as work:
        for seq in lengths:
            for v in variants:
                r = run_case(a.config, a.nproc, seq, v, a.steps, a.overrides, work)
                results[(v, seq)] = r
                print(f"  {v:>6} s={seq:>7}: {r['tokens_per_s']:10.0f} tok/s  {r['tflops_per_gpu'] * 1e3:8.2f} "
                      f"GFLOP/s/rank  peak {r['peak_mem_gb']:.2f} GiB", flush=True)
    print(f"\n{os.path.basename(a.config)}, {a.nproc} rank(s), median of steps after warm-up")
    print("| length | infini tok/s | causal tok/s | infini / causal | infini tok/s vs shortest |")
    print("|---:|---:|---:|---:|---:|")
    base = results.get(("infini", lengths[0]))
    for seq in lengths:
        i, c = results.get(("infini", seq)), results.get(("causal", seq))
        ratio = f"{i['tokens_per_s'] / c['tokens_per_s']:.2f}x" if i and c else "-"
        flat = f"{i['tokens_per_s'] / base['tokens_per_s']:.2f}" if i and base else "-"
        print(f"| {seq} | {i['tokens_per_s']:.0f} | {c['tokens_per_s'] if c else float('nan'):.0f} | {ratio} | {flat} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({f"{v}-{s}": r for (v, s), r in results.items()}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
