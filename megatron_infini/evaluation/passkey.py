"""Passkey retrieval (protocol in docs/infini.md): accuracy per input length x needle depth.

    megatron-infini eval passkey --checkpoint runs/x --lengths 4k,32k,128k,1m \\
        --depths 0,0.25,0.5,0.75,1 --samples 5 --json passkey.json
    megatron-infini eval passkey-data --out data/passkey_ft --length 5k --samples 6400

Each prompt is streamed segment by segment with the memory carried (`StreamingLM`), then the
model generates greedily; a sample is correct when the first integer it generates equals the
key. Samples of one (length, depth) cell have the same length and run as one batch. Lengths are
any number of tokens (or multiples of the recipe's T with an offset: 16T+37); the needle moves
to a random offset inside the segment its depth puts it in (`--fixed-offsets`: exactly at its
depth), and `--haystack-numbers R` puts numbers of the key's form into the filler.
`--no-memory` adds the ablation (every segment starts from an empty memory) as a second table.
`passkey-data` writes fine-tuning documents (the paper fine-tunes 400 steps on 5K-token
passkey inputs) as JSONL plus preprocessed shards for the trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from megatron_infini.inference.loader import add_dtype_arg

from .passkey_data import PasskeyBuilder, PasskeySample, parse_key, random_key
from .recipe import find_recipe, parse_lengths, parse_size, size_label  # noqa: F401 (public names)


@torch.no_grad()
def score_samples(model, tokenizer, samples: Sequence[PasskeySample], chunk_segments: int = 16,
                  batch_size: int = 16, memory: bool = True) -> List[Optional[int]]:
    """Stream each prompt, generate greedily, return the integer each sample answered (or None).
    Prompts in one batch must have the same length."""
    from megatron_infini.inference.stream import StreamingLM

    lm = StreamingLM(model, chunk_segments=chunk_segments, vocab_limit=tokenizer.vocab_size, memory=memory)
    preds: List[Optional[int]] = []
    try:
        for i in range(0, len(samples), batch_size):
            group = samples[i:i + batch_size]
            if len({len(s.ids) for s in group}) != 1:
                raise ValueError("prompts of one batch must have the same length")
            lm.reset()
            lm.feed(torch.tensor([s.ids for s in group], dtype=torch.long))
            new = lm.generate(max(len(s.answer_ids) for s in group) + 1)  # [b, K]
            preds += [parse_key(tokenizer.decode(row.tolist())) for row in new]
    finally:
        lm.close()
    return preds


def make_samples(builder: PasskeyBuilder, length: int, depth: float, n: int, seed: int,
                 key_digits: Optional[int] = None, segment_length: Optional[int] = None,
                 numbers: float = 0.0) -> List[PasskeySample]:
    """`n` prompts of one cell. The keys depend on (seed, length, depth) only; the in-segment
    offsets (`segment_length`) and haystack numbers (`numbers` per 100 tokens) on a second
    stream of the same seed, so the keys are those of the fixed-offset protocol."""
    rng = random.Random(f"{seed}-{length}-{depth}")
    place = random.Random(f"{seed}-{length}-{depth}-place")
    return [builder.build(length, depth, random_key(rng, key_digits), rng=place, segment_length=segment_length,
                          numbers=numbers, key_digits=key_digits) for _ in range(n)]


def model_segment_length(model) -> int:
    """The segment length of a loaded model (for needle offsets inside a segment)."""
    from megatron_infini.inference.stream import unwrap

    return int(unwrap(model).config.segment_length)


def run_passkey(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], samples: int,
                seed: int = 0, key_digits: Optional[int] = None, chunk_segments: int = 16,
                batch_size: int = 16, memory: bool = True, log=print, intro: bool = True,
                haystack_numbers: float = 0.0, random_offsets: bool = True) -> Dict[str, dict]:
    """{"table": {"{length}": {"{depth}": accuracy}}, "cells": [...]}. `random_offsets`: each
    needle at a random offset in the segment its depth puts it in (seeded by `seed`);
    `haystack_numbers`: numbers of the keys' form per 100 filler tokens."""
    builder = PasskeyBuilder(tokenizer, intro=intro)
    n = model_segment_length(model) if random_offsets else None
    return score_grid(model, tokenizer, lengths, depths,
                      lambda length, depth: make_samples(builder, length, depth, samples, seed, key_digits, n,
                                                         haystack_numbers),
                      chunk_segments, batch_size, memory, log, tag="passkey")


def cell_scores(preds: Sequence[Optional[int]], group: Sequence[PasskeySample]) -> tuple:
    """(accuracy, distractor_rate) of one cell: the share of answers equal to the asked key, and
    the share equal to the key of another needle of the same prompt."""
    correct = sum(p == s.key for p, s in zip(preds, group))
    distracted = sum(p is not None and p != s.key and p in s.distractors for p, s in zip(preds, group))
    return correct / len(group), distracted / len(group)


def score_grid(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], make_group,
               chunk_segments: int, batch_size: int, memory: bool, log, tag: str) -> Dict[str, dict]:
    """Accuracy per (length, depth) cell of the samples `make_group(length, depth)` gives:
    {"table": {"{length}": {"{depth}": accuracy}}, "cells": [...]}; the grid of `eval passkey`
    and `eval needle`."""
    table: Dict[str, Dict[str, float]] = {}
    cells = []
    segment = model_segment_length(model)
    for length in lengths:
        row = table.setdefault(size_label(length), {})
        for depth in depths:
            group = make_group(length, depth)
            t0 = time.perf_counter()
            preds = score_samples(model, tokenizer, group, chunk_segments, batch_size, memory)
            acc, distracted = cell_scores(preds, group)
            row[f"{depth:g}"] = acc
            cells.append({"length": length, "depth": depth, "accuracy": acc, "samples": len(group),
                          "keys": [s.key for s in group], "answers": preds, "distractor_rate": distracted,
                          "distractors": [s.distractors for s in group],
                          "needle_offsets": [s.needle_start % segment for s in group],
                          "seconds": round(time.perf_counter() - t0, 2)})
            if log:
                log(f"[{tag}] memory={'on' if memory else 'off'} length={size_label(length)} depth={depth:g}: "
                    f"{acc:.0%} ({round(acc * len(group))}/{len(group)}), distractor {distracted:.0%} "
                    f"in {cells[-1]['seconds']} s")
    return {"table": table, "cells": cells}


def format_table(table: Dict[str, Dict[str, float]], title: str = "") -> str:
    depths = list(next(iter(table.values())).keys()) if table else []
    head = f"{'length':>8} | " + " | ".join(f"{'d=' + d:>6}" for d in depths) + " |   mean"
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for length, row in table.items():
        vals = [row[d] for d in depths]
        lines.append(f"{length:>8} | " + " | ".join(f"{v:>6.0%}" for v in vals) + f" | {sum(vals) / len(vals):>6.0%}")
    return "\n".join(lines)


def format_distractors(results: dict) -> str:
    """One line: the distractor rate per length (mean over depths)."""
    by_length: Dict[int, List[float]] = {}
    for c in results["cells"]:
        by_length.setdefault(c["length"], []).append(c["distractor_rate"])
    return "distractor rate (answers giving another needle's key): " + ", ".join(
        f"{size_label(n)} {sum(v) / len(v):.0%}" for n, v in by_length.items())


def log_wandb_table(results: Dict[str, dict], project: str, run_name: Optional[str], mode: str) -> None:
    """A W&B table (memory, length, depth, accuracy), when wandb_mode is not 'disabled'."""
    if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return
    import wandb

    run = wandb.init(project=project, name=run_name, mode=mode, job_type="eval-passkey")
    try:
        table = wandb.Table(columns=["memory", "length", "depth", "accuracy"])
        for memory, res in results.items():
            for c in res["cells"]:
                table.add_data(memory, c["length"], c["depth"], c["accuracy"])
        run.log({"passkey/accuracy": table})
    finally:
        run.finish()


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory, its checkpoints/ directory, or an iter_ directory")
    p.add_argument("--chunk-segments", type=int, default=16, help="whole segments per forward call")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", help="write the results to this JSON file")
    add_dtype_arg(p)
    p.add_argument("overrides", nargs="*", help="config overrides for the saved config (shape must not change)")


def add_hardening_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--haystack-numbers", type=float, default=0.0, metavar="R",
                   help="put about R numbers of the keys' form per 100 haystack tokens (default 0: none)")
    p.add_argument("--fixed-offsets", action="store_true",
                   help="place the needle exactly at its depth (the protocol before randomised in-segment "
                        "offsets; by default it moves to a random offset in its segment, seeded by --seed)")


def apply_recipe(args) -> dict:
    """Fill --key-digits / --intro left unset from the checkpoint's passkey_recipe.json (if any);
    returns the recipe ({} when there is none)."""
    recipe = find_recipe(args.checkpoint) or {}
    if args.key_digits is None:
        args.key_digits = recipe.get("key_digits")
    if args.intro is None:
        args.intro = bool(recipe.get("intro", True))
    return recipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megatron-infini eval passkey", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--lengths", default="1k,4k",
                   help="comma-separated prompt lengths in tokens (4k, 1m, ...) or multiples of the recipe's "
                        "training length (T, 4T, 64T)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=5, help="prompts per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--key-digits", type=int, default=None,
                   help="keys uniform over D-digit numbers (default: the protocol's 1..50000)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts streamed together")
    p.add_argument("--no-memory", action="store_true", help="also run the memory-off ablation")
    add_hardening_args(p)
    intro = p.add_mutually_exclusive_group()
    intro.add_argument("--no-intro", dest="intro", action="store_false", default=None,
                       help="leave out the protocol's introduction (as the synthetic recall task does)")
    intro.add_argument("--intro", dest="intro", action="store_true", help="keep the introduction (the default)")
    p.add_argument("--wandb-mode", default="disabled", choices=["online", "offline", "disabled"])
    p.add_argument("--wandb-project", default="megatron-infini")
    args = p.parse_args(argv)
    try:
        recipe = apply_recipe(args)
        lengths = parse_lengths(args.lengths, recipe.get("train_length"))
        depths = [float(x) for x in args.depths.split(",") if x]
    except ValueError as e:
        print(f"megatron-infini eval passkey: {e}", file=sys.stderr)
        return 2
    if any(not 0 <= d <= 1 for d in depths) or args.haystack_numbers < 0:
        print("megatron-infini eval passkey: --depths must lie in [0, 1] and --haystack-numbers be >= 0",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_infini.inference.loader import inference_session, load_model_for_inference

    with inference_session():
        model, cfg, tok = load_model_for_inference(args.checkpoint, overrides=args.overrides, dtype=args.dtype)
        results = {}
        for memory in ([True, False] if args.no_memory else [True]):
            key = "on" if memory else "off"
            results[key] = run_passkey(model, tok, lengths, depths, args.samples, args.seed, args.key_digits,
                                       args.chunk_segments, args.batch_size, memory,
                                       log=lambda m: print(m, file=sys.stderr), intro=args.intro,
                                       haystack_numbers=args.haystack_numbers, random_offsets=not args.fixed_offsets)
            print(format_table(results[key]["table"], f"passkey accuracy, memory {key} ({model.checkpoint_dir})"))
        out = {"checkpoint": model.checkpoint_dir, "segment_length": cfg.model.segment_length,
               "samples": args.samples, "seed": args.seed, "key_digits": args.key_digits, "intro": args.intro,
               "recipe": recipe or None, "haystack_numbers": args.haystack_numbers,
               "random_offsets": not args.fixed_offsets, "results": results}
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=1)
        log_wandb_table(results, args.wandb_project, f"passkey-{os.path.basename(os.path.dirname(os.path.dirname(model.checkpoint_dir)))}",
                        args.wandb_mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
