"""Compare the memory types at equal budget on CPU: same tiny model, data, steps and seed.

    python tools/compare_memories.py --out runs/compare_memories            # ~ a few minutes on 2 cores
    python tools/compare_memories.py --out runs/cmp --steps 200 --variants infini-delta,compressive
    python tools/compare_memories.py --out runs/ppl --steps 1000 --seq-length 512 --max-tokens 8192 \
        --set model.segment_length=32                      # docs/memories.md's perplexity table

Variants (all on configs/debug.yaml: 2 layers, hidden 64, 4 query / 2 key-value heads x 16,
segments of N = 64, training sequences of T = 256 tokens):
    infini-linear, infini-delta   Infini-attention, linear / delta memory update (the paper's layer)
    infini-gated                  linear, with the learned write strengths (memory_write_gate=hard)
    compressive                   Compressive Transformer: memory 64 tokens, 32 compressed slots, c = 2
    xl                            Transformer-XL: memory 64 tokens
    xl-equal                      Transformer-XL: memory 8 tokens, the state bytes of the Infini memory
                                  (8 x 2 heads x (2 x 16 + 1) x 4 B = 2112 B against 2 x 16 x 17 x 4 B = 2176 B)
    local                         no memory (memory_enabled=false): attention within the segment only

Each variant is trained by the real trainer (one process), then evaluated in this process with
the library's own evaluations: perplexity per segment position on the held-out play (streamed
with the memory carried, and with the memory switched off: the on / off ratio), passkey accuracy at T, 4T and 16T tokens, the memory state kept per
layer after streaming (bytes, this rank), and tokens/s (training, and streaming evaluation).
Writes OUT/compare.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "infini-linear": ["model.memory_update=linear"],
    "infini-delta": ["model.memory_update=delta"],
    "infini-gated": ["model.memory_update=linear", "model.memory_write_gate=hard"],
    "compressive": ["model.memory_type=compressive", "model.xl_memory_length=64",
                    "model.compressed_memory_length=32", "model.compression_rate=2"],
    "xl": ["model.memory_type=xl", "model.xl_memory_length=64"],
    "xl-equal": ["model.memory_type=xl", "model.xl_memory_length=8"],
    "local": ["model.memory_enabled=false"],
}


def train(name: str, out: str, steps: int, seq: int, threads: int, extra=()) -> dict:
    run_dir = os.path.join(out, name)
    cmd = [sys.executable, "-m", "megatron_infini.train", "--config", os.path.join(REPO, "configs", "debug.yaml"),
           f"run_dir={run_dir}", f"train.steps={steps}", f"train.seq_length={seq}", "train.eval_interval=0",
           "checkpoint.save_interval=0", "checkpoint.resume=none", "logging.progress_bar=false",
           "deepspeed.zero_stage=0", *extra, *VARIANTS[name]]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"training {name} failed:\n{proc.stdout[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        steps_ = [r for r in map(json.loads, fh) if r.get("kind") != "event"]
    later = sorted(r["tokens_per_s"] for r in (steps_[2:] or steps_))  # the first steps include warm-up
    return {"run_dir": run_dir, "train_seconds": round(time.perf_counter() - t0, 1),
            "final_loss": sum(r["loss"] for r in steps_[-5:]) / len(steps_[-5:]),
            "train_tokens_per_s": later[len(later) // 2],  # median: robust to a shared machine
            "reconstruction_loss": steps_[-1].get("aux/reconstruction_loss")}


def evaluate(run_dir: str, seq: int, max_tokens: int, samples: int) -> dict:
    import torch

    from megatron_infini.evaluation.passkey import run_passkey
    from megatron_infini.evaluation.perplexity import iter_token_documents, run_perplexity
    from megatron_infini.data import SHAKESPEARE_VALID_PREFIX
    from megatron_infini.inference.loader import load_model_for_inference
    from megatron_infini.inference.stream import StreamingLM, memory_snapshot

    model, cfg, tok = load_model_for_inference(run_dir)
    N = cfg.model.segment_length
    docs = [d[:max_tokens + 1] for d in iter_token_documents([str(SHAKESPEARE_VALID_PREFIX)], tok, 1)]
    t0 = time.perf_counter()
    ppl = run_perplexity(model, docs, N, ablation=True, log=None)
    eval_tps = 2 * sum(len(d) - 1 for d in docs) / (time.perf_counter() - t0)  # memory on, then off
    lengths = [seq, 4 * seq, 16 * seq]
    pk = run_passkey(model, tok, lengths, [0.0, 0.5, 1.0], samples, seed=0, log=None)["table"]
    lm = StreamingLM(model)  # memory kept per layer after streaming 4T tokens
    lm.feed(torch.from_numpy(docs[0][: 4 * seq]).unsqueeze(0))
    sizes = [sum(t.numel() * t.element_size() for t in m) for m in memory_snapshot(lm.model) if m is not None]
    lm.close()
    return {"ppl_bins": {f"{b['segments'][0]}-{b['segments'][1]}": b["ppl_memory_on"] for b in ppl["bins"]},
            "ppl_off_bins": {f"{b['segments'][0]}-{b['segments'][1]}": b["ppl_memory_off"] for b in ppl["bins"]},
            "ppl_all": ppl["overall"]["ppl_memory_on"], "tokens_evaluated": int(sum(len(d) - 1 for d in docs)),
            "passkey": {k: sum(v.values()) / len(v) for k, v in pk.items()},
            "memory_bytes_per_layer": sizes[0] if sizes else 0, "eval_tokens_per_s": eval_tps}


def table(results: dict) -> str:
    first = next(iter(results.values()))
    bins, pk = list(first["ppl_bins"]), list(first["passkey"])
    late = bins[-2:]  # the on / off ratio where the memory holds the most
    head = (["variant", "train loss"] + [f"ppl seg {b}" for b in bins] + ["ppl all"]
            + [f"on/off seg {b}" for b in late] + [f"passkey {p}" for p in pk]
            + ["memory / layer", "train tok/s", "eval tok/s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        row = ([name, f"{r['final_loss']:.3f}"] + [f"{r['ppl_bins'][b]:.1f}" for b in bins] + [f"{r['ppl_all']:.1f}"]
               + [f"{r['ppl_bins'][b] / r['ppl_off_bins'][b]:.3f}" for b in late]
               + [f"{r['passkey'][p]:.0%}" for p in pk]
               + [f"{r['memory_bytes_per_layer'] / 1024:.1f} KiB", f"{r['train_tokens_per_s']:.0f}",
                  f"{r['eval_tokens_per_s']:.0f}"])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare_memories", help="directory for the runs and compare.json")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per variant (8 x T tokens each)")
    p.add_argument("--seq-length", type=int, default=256, help="T: training sequence length")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens of the held-out play for perplexity")
    p.add_argument("--samples", type=int, default=2, help="passkey prompts per (length, depth)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (training and evaluation)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer config override for every variant (repeatable), e.g. model.segment_length=32")
    args = p.parse_args(argv)
    if any("=" not in o for o in args.set):
        print(f"compare_memories: --set takes KEY=VALUE, got {args.set}", file=sys.stderr)
        return 2
    names = [n for n in args.variants.split(",") if n]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        print(f"compare_memories: --variants: unknown {bad}; known {list(VARIANTS)}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    from megatron_infini.inference.loader import inference_session

    results = {}
    for name in names:  # trainings first: each opens its own process group
        results[name] = train(name, args.out, args.steps, args.seq_length, args.threads, args.set)
        print(f"[compare] trained {name} in {results[name]['train_seconds']} s", file=sys.stderr, flush=True)
    with inference_session():
        for name in names:
            t0 = time.perf_counter()
            results[name].update(evaluate(results[name]["run_dir"], args.seq_length, args.max_tokens, args.samples))
            print(f"[compare] evaluated {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    with open(os.path.join(args.out, "compare.json"), "w") as fh:
        json.dump({"args": vars(args), "results": results}, fh, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
