"""Length generalisation of passkey retrieval: which training choices make the memory work at
16x-64x the training length, and why it fails when it does (docs/generalisation.md).

    python tools/generalisation.py --out runs/gen --seeds 0          # the docs' table (~15 min a variant)
    python tools/generalisation.py --out runs/gen --variants mixed-weighted-hard-init0.1 --seeds 1
    python tools/generalisation.py --out runs/gen --table          # the markdown table of what ran
    python tools/generalisation.py --trajectory RUN_DIR --mults 4,16   # retrieval per saved checkpoint

Every variant trains the tiny model of configs/passkey_tiny.yaml with the real trainer (one
process) on passkey documents of at most T = train.seq_length tokens, then evaluates with
the `eval passkey` machinery at T, 4T, 16T and 64T, needle depths 0..1, memory on and off,
over `--eval-seeds`; and measures at depth 0.5 the needle's share of the retrieval weights of
the query that predicts the key's first digit (`retrieval_stats.needle_share`) and the gates. Results land in
OUT/<variant>-s<seed>/result.json; finished runs are not redone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "passkey_tiny.yaml")
T = 128
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]

#: name -> (data options, trainer overrides on top of configs/passkey_tiny.yaml with the paper's
#: layer: model.memory_write_gate=none, memory_write_init=0.5, memory_layers=null).
#: Data: min_length (None: every document T long), answer_weight (0: plain LM loss on everything).
VARIANTS = {
    "paper": (dict(min_length=None, answer_weight=0), []),
    "delta": (dict(min_length=None, answer_weight=0), ["model.memory_update=delta"]),
    "mixed": (dict(min_length=48, answer_weight=0), []),
    "weighted": (dict(min_length=None, answer_weight=20), []),
    "mixed-weighted": (dict(min_length=48, answer_weight=20), []),
    "mixed-weighted-delta": (dict(min_length=48, answer_weight=20), ["model.memory_update=delta"]),
    "mixed-weighted-gate2": (dict(min_length=48, answer_weight=20), ["model.gate_init=2.0"]),
    "mixed-weighted-gatelr": (dict(min_length=48, answer_weight=20), ["optimizer.gate_lr=3.0e-3"]),
    "mixed-weighted-sigmoid": (dict(min_length=48, answer_weight=20), ["model.memory_write_gate=sigmoid"]),
    "hard": (dict(min_length=None, answer_weight=0), ["model.memory_write_gate=hard"]),
    "mixed-weighted-hard": (dict(min_length=48, answer_weight=20), ["model.memory_write_gate=hard"]),
    "mixed-weighted-hard-init0.1": (dict(min_length=48, answer_weight=20),
                                    ["model.memory_write_gate=hard", "model.memory_write_init=0.1"]),
    "mixed-weighted-hard-delta": (dict(min_length=48, answer_weight=20),
                                  ["model.memory_write_gate=hard", "model.memory_update=delta"]),
}

#: Round 2, on top of the recipe (mixed-weighted-hard-init0.1): memory in the top layer only,
#: gate init, learning rate, the L1 penalty on the write strengths.
_MW, _RECIPE = dict(min_length=48, answer_weight=20), ["model.memory_write_gate=hard", "model.memory_write_init=0.1"]
for _name, _extra in {"top": ["model.memory_layers=[2]"],
                      "top-gate1": ["model.memory_layers=[2]", "model.gate_init=1.0"],
                      "top-lr5": ["model.memory_layers=[2]", "optimizer.lr=5.0e-3"],
                      "l1-0.05": ["model.memory_write_l1=0.05"],
                      "top-l1-0.05": ["model.memory_layers=[2]", "model.memory_write_l1=0.05"],
                      "top-l1-0.01": ["model.memory_layers=[2]", "model.memory_write_l1=0.01"],
                      "l1-0.05-from1200": ["model.memory_write_l1=0.05", "model.memory_write_l1_start=1200"],
                      "top-l1-0.05-from1200": ["model.memory_layers=[2]", "model.memory_write_l1=0.05",
                                               "model.memory_write_l1_start=1200"]}.items():
    VARIANTS[f"mixed-weighted-hard-init0.1-{_name}"] = (_MW, _RECIPE + _extra)

#: The variants of the table in docs/generalisation.md.
DOCS_TABLE = ("paper", "mixed-weighted", "mixed-weighted-delta", "mixed-weighted-sigmoid", "mixed-weighted-hard",
              "mixed-weighted-hard-init0.1")


def data_for(out: str, opts: dict, samples: int, digits: int, seed: int) -> tuple:
    from megatron_infini.data import SHAKESPEARE_TOKENIZER
    from megatron_infini.data.tokenizer import Tokenizer
    from megatron_infini.evaluation.finetune_data import write_passkey_data

    name = f"L{T}-min{opts['min_length']}-w{opts['answer_weight']}-d{digits}-n{samples}-s{seed}"
    prefix = os.path.join(out, "data", name, "train")
    if not os.path.exists(prefix + ".idx"):
        write_passkey_data(prefix, Tokenizer(SHAKESPEARE_TOKENIZER), T, samples, opts["min_length"], digits,
                           intro=False, answer_weight=opts["answer_weight"], seed=seed, jsonl=False)
    return prefix, (prefix + "_weights" if opts["answer_weight"] else "")


def train(run_dir: str, prefix: str, weights: str, overrides: list, steps: int, seed: int) -> float:
    batch = 16 * 128 // T  # documents per step: the same tokens per step at every training length
    overrides = [f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}", *overrides]
    cmd = [sys.executable, "-m", "megatron_infini.train", "--config", CONFIG, f"run_dir={run_dir}",
           f"data.train_data={prefix}", f"data.train_loss_weights={weights}", f"train.steps={steps}",
           f"train.seq_length={T}", f"train.seed={seed}", f"data.seed={seed}", "model.memory_write_gate=none",
           "model.memory_write_init=0.5", "model.memory_layers=null",
           *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    t0 = time.time()
    with open(run_dir + ".log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"training failed (exit {rc}): see {run_dir}.log")
    return time.time() - t0


def accuracy_by_length(model, tok, lengths: list, depths: list, eval_seeds: list, samples: int, digits: int,
                       memory: bool = True) -> dict:
    """{length label: [accuracy over `depths`, one per evaluation seed]} in the recipe's format."""
    from megatron_infini.evaluation.passkey import run_passkey

    acc = {}
    for seed in eval_seeds:
        res = run_passkey(model, tok, lengths, depths, samples, seed, digits, chunk_segments=64, batch_size=32,
                          memory=memory, log=None, intro=False)
        for length, row in res["table"].items():
            acc.setdefault(length, []).append(sum(row.values()) / len(row))
    return acc


def mean_head_shares(model, tok, length: int, digits: int) -> tuple:
    """The needle's share of the retrieval weights per layer and head, mean of 4 prompts of
    `length` tokens with the needle at depth 0.5, and the gates (sigmoid) per layer and head."""
    from megatron_infini.evaluation.passkey import make_samples
    from megatron_infini.evaluation.passkey_data import PasskeyBuilder
    from megatron_infini.evaluation.retrieval_stats import needle_share

    st = [needle_share(model, s, tok) for s in make_samples(PasskeyBuilder(tok, intro=False), length, 0.5, 4, 99, digits)]
    shares = [[sum(x["share"][l][h] for x in st) / len(st) for h in range(len(st[0]["share"][l]))]
              for l in range(len(st[0]["share"]))]
    return shares, st[0]["gate"]


def evaluate(run_dir: str, digits: int, eval_seeds: list, samples: int, mults: list, depths: list) -> dict:
    import torch

    from megatron_infini.inference.loader import inference_session, load_model_for_inference

    torch.set_num_threads(1)
    lengths = [m * T for m in mults]
    out = {"accuracy": {}, "share": {}, "gate": None}
    with inference_session():
        model, cfg, tok = load_model_for_inference(run_dir)
        for memory in (True, False):
            out["accuracy"]["on" if memory else "off"] = accuracy_by_length(model, tok, lengths, depths, eval_seeds,
                                                                           samples, digits, memory)
        for length in lengths:
            shares, out["gate"] = mean_head_shares(model, tok, length, digits)
            # per layer, the head most able to read the needle
            out["share"][str(length)] = [max(layer) for layer in shares]
    return out


def head_shares(run_dir: str, digits: int, mults: list) -> str:
    """The needle's share of the retrieval weights per layer and head (mean of 4 prompts at depth
    0.5) at each length: which heads store only the needle (share 1 at every length) and which
    mix it with filler (share falling with the length)."""
    import torch

    from megatron_infini.inference.loader import inference_session, load_model_for_inference

    torch.set_num_threads(1)
    lines = [f"needle share per head (layer 1 heads; layer 2 heads), depth 0.5, {run_dir}"]
    with inference_session():
        model, _, tok = load_model_for_inference(run_dir)
        for m in mults:
            shares, gate = mean_head_shares(model, tok, m * T, digits)
            lines.append(f"{m:>3}T: " + "; ".join(",".join(f"{v:.3f}" for v in hs) for hs in shares))
        lines.append("gates (sigmoid): " + "; ".join(",".join(f"{g:.2f}" for g in hs) for hs in gate))
    return "\n".join(lines)


def trajectory(run_dir: str, digits: int, eval_seeds: list, samples: int, mults: list) -> str:
    """Retrieval with memory (mean over depths 0..1 and `eval_seeds`) at each multiple of T for
    every saved checkpoint of one run (train it with checkpoint.save_interval and
    checkpoint.keep_last=0): whether 16T holds steady once retrieval is learned."""
    import torch

    from megatron_infini.checkpointing.manager import complete_checkpoints, iter_dir
    from megatron_infini.evaluation.recipe import find_recipe
    from megatron_infini.inference.loader import inference_session, load_model_for_inference

    torch.set_num_threads(1)
    t = (find_recipe(run_dir) or {}).get("train_length", T)
    root = os.path.join(run_dir, "checkpoints")
    lines = ["| step | " + " | ".join(f"{m}T on" for m in mults) + " |", "|---|" + "---|" * len(mults)]
    with inference_session():
        for step in sorted(complete_checkpoints(root)):
            model, _, tok = load_model_for_inference(iter_dir(root, step))
            acc = accuracy_by_length(model, tok, [m * t for m in mults], DEPTHS, eval_seeds, samples, digits)
            lines.append(f"| {step} | " + " | ".join(f"{sum(a) / len(a):.0%}" for a in acc.values()) + " |")
    return "\n".join(lines)


def plateau_exit(metrics: str, level: float = 0.45, window: int = 50) -> str:
    """First step at which the mean training loss of the last `window` steps falls below
    `level` (the plateau, everything but the key predicted, sits at ~0.6), or "not left"."""
    if not os.path.isfile(metrics):
        return "?"
    losses = [json.loads(line) for line in open(metrics) if '"loss"' in line]
    for i, r in enumerate(losses):
        last = losses[max(0, i - window + 1):i + 1]
        if i + 1 >= window and sum(x["loss"] for x in last) / len(last) < level:
            return str(r["step"])
    return "not left"


def table(out: str) -> str:
    rows = []
    for name in sorted(os.listdir(out)):
        f = os.path.join(out, name, "result.json")
        if os.path.isfile(f):
            rows.append(json.load(open(f)))
    if not rows:
        return "no results"
    mults = rows[0]["mults"]
    head = ("| variant | steps | train seed | " + " | ".join(f"{m}T on" for m in mults) + " | "
            + " | ".join(f"{m}T off" for m in mults)
            + " | needle share L1/L2 at T -> 16T | gates (sigmoid) | plateau left at | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        acc = r["eval"]["accuracy"]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        on = [f"{mean(acc['on'][k]):.0%}" for k in acc["on"]]
        off = [f"{mean(acc['off'][k]):.0%}" for k in acc["off"]]
        sh = r["eval"]["share"]
        keys = list(sh)
        share = (" / ".join(f"{x:.2f}" for x in sh[keys[0]]) + " -> "
                 + " / ".join(f"{x:.3f}" for x in sh[keys[min(2, len(keys) - 1)]]))
        gates = "; ".join(",".join(f"{g:.2f}" for g in layer) for layer in r["eval"]["gate"])
        left = plateau_exit(os.path.join(out, f"{r['variant']}-s{r['seed']}", "metrics.jsonl"))
        lines.append(f"| {r['variant']} | {r['steps']} | {r['seed']} | " + " | ".join(on) + " | " + " | ".join(off)
                     + f" | {share} | {gates} | {left} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    global T
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gen")
    p.add_argument("--variants", default=",".join(DOCS_TABLE), help=f"comma-separated of {list(VARIANTS)}")
    p.add_argument("--seeds", default="0", help="training seeds")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--digits", type=int, default=2)
    p.add_argument("--eval-seeds", default="1,2")
    p.add_argument("--samples", type=int, default=8, help="prompts per (length, depth) cell and eval seed")
    p.add_argument("--mults", default="1,4,16,64", help="evaluation lengths as multiples of T")
    p.add_argument("--train-length", type=int, default=T,
                   help="T: longest training prompt (multiple of 16); 16 * 128 / T documents a step")
    p.add_argument("--table", action="store_true", help="only print the table of finished runs")
    p.add_argument("--heads", metavar="RUN_DIR", help="only print the needle share per head of one run")
    p.add_argument("--trajectory", metavar="RUN_DIR",
                   help="only print retrieval at --mults for every saved checkpoint of one run")
    args = p.parse_args(argv)
    from megatron_infini.evaluation.recipe import write_recipe

    if args.heads:
        print(head_shares(args.heads, args.digits, [int(x) for x in args.mults.split(",")]))
        return 0
    if args.trajectory:
        print(trajectory(args.trajectory, args.digits, [int(s) for s in args.eval_seeds.split(",")], args.samples,
                         [int(x) for x in args.mults.split(",")]))
        return 0
    if args.table:
        print(table(args.out))
        return 0
    if args.train_length % 16 or not 64 <= args.train_length <= 2048:
        p.error("--train-length must be a multiple of 16 in 64..2048")
    T = args.train_length
    mults = [int(x) for x in args.mults.split(",")]
    for name in args.variants.split(","):
        opts, overrides = VARIANTS[name]
        for seed in (int(s) for s in args.seeds.split(",")):
            label = name if T == 128 else f"{name}-T{T}"
            run_dir = os.path.join(args.out, f"{label}-s{seed}")
            if os.path.isfile(os.path.join(run_dir, "result.json")):
                continue
            prefix, weights = data_for(args.out, opts, args.steps * (16 * 128 // T), args.digits, seed)
            train_s = train(run_dir, prefix, weights, overrides, args.steps, seed)
            write_recipe(run_dir, T, args.digits, intro=False)  # `eval passkey --checkpoint RUN_DIR` reads it
            ev = evaluate(run_dir, args.digits, [int(s) for s in args.eval_seeds.split(",")], args.samples, mults, DEPTHS)
            res = {"variant": label, "train_length": T, "seed": seed, "steps": args.steps, "mults": mults,
                   "train_s": train_s, "data": opts, "overrides": overrides, "eval": ev}
            json.dump(res, open(os.path.join(run_dir, "result.json"), "w"), indent=1)
            print(table(args.out).splitlines()[-1], flush=True)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
