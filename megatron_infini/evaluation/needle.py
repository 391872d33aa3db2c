"""Needle in a haystack: a key hidden in natural text among distractor keys, one key asked.

    megatron-infini eval needle --checkpoint runs/x --lengths 4k,32k --depths 0,0.5,1 --needles 3 \\
        --samples 5 --no-memory --json needle.json

Harder than `eval passkey` in two ways: the haystack is the held-out play shipped in
megatron_infini/data/corpus (The Tempest, 34K tokens, a window starting at a random line;
repeated when a prompt is longer), not a repeated filler sentence the memory can learn; and
with `--needles K` > 1 the prompt holds K keys with different names ("The blue pass key is
K. Remember it. K is the blue pass key."), the asked one at the given depth and the others at
random depths, and the question names one ("What is the blue pass key? The blue pass key
is"). With `--needles 1` the needle and question are exactly the passkey protocol's. Prompts
(needle_data.py) have exactly the requested length (any number of tokens: 1000, 16T+37); the
asked needle sits at a random offset in its segment (`--fixed-offsets`: at its depth exactly);
`--haystack-numbers R` sprinkles about R numbers of the keys' form per 100 haystack tokens
(the play has no digits). Same streaming machinery (`passkey.score_samples`), same table and
JSON shape as `eval passkey` (plus "needles", "haystack", "haystack_numbers", and per cell
"distractor_rate": the share of answers that give another needle's key); the checkpoint's
passkey_recipe.json / needle_recipe.json sets the key digits, the introduction and the
default --needles.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Dict, Optional, Sequence

import torch

from .needle_data import NAMED_NEEDLE, NAMED_QUESTION, NAMES, NeedleBuilder, haystack_ids  # noqa: F401 (public names)


def run_needle(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], samples: int, seed: int = 0,
               key_digits: Optional[int] = None, needles: int = 1, intro: bool = True, chunk_segments: int = 16,
               batch_size: int = 16, memory: bool = True, haystack: Optional[str] = None, log=print,
               haystack_numbers: float = 0.0, random_offsets: bool = True) -> Dict[str, dict]:
    """{"table": {"{length}": {"{depth}": accuracy}}, "cells": [...]}, as `passkey.run_passkey`
    (each cell with its `distractor_rate`). `random_offsets`: the asked needle at a random
    offset inside the segment its depth puts it in (seeded by `seed`); `haystack_numbers`:
    numbers of the keys' form per 100 haystack tokens."""
    from .passkey import model_segment_length, score_grid

    builder = NeedleBuilder(tokenizer, haystack_ids(tokenizer, haystack), needles, intro, haystack_numbers,
                            model_segment_length(model) if random_offsets else None)

    def make_group(length, depth):
        rng = random.Random(f"{seed}-{length}-{depth}-needle")
        return [builder.build(length, depth, rng, key_digits) for _ in range(samples)]

    return score_grid(model, tokenizer, lengths, depths, make_group, chunk_segments, batch_size, memory, log,
                      tag="needle")


def main(argv=None) -> int:
    from .passkey import add_common_args, add_hardening_args, apply_recipe, format_table, format_distractors
    from .recipe import parse_lengths

    p = argparse.ArgumentParser(prog="megatron-infini eval needle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--lengths", default="1k,4k", help="prompt lengths in tokens, or multiples of the recipe's T")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="depths in [0, 1] of the asked needle")
    p.add_argument("--needles", type=int, default=None,
                   help="keys in each prompt (1: the passkey needle alone; default: the recipe's, else 3)")
    p.add_argument("--samples", type=int, default=5, help="prompts per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--key-digits", type=int, default=None, help="default: the recipe's, else keys 1..50000")
    p.add_argument("--haystack", default=None, help="text or JSONL ({'text'}) file (default: the held-out play)")
    add_hardening_args(p)
    p.add_argument("--batch-size", type=int, default=16, help="prompts streamed together")
    p.add_argument("--no-memory", action="store_true", help="also run the memory-off ablation")
    intro = p.add_mutually_exclusive_group()
    intro.add_argument("--no-intro", dest="intro", action="store_false", default=None,
                       help="leave out the protocol's introduction")
    intro.add_argument("--intro", dest="intro", action="store_true", help="keep the introduction")
    args = p.parse_args(argv)
    try:
        recipe = apply_recipe(args)
        lengths = parse_lengths(args.lengths, recipe.get("train_length"))
        depths = [float(x) for x in args.depths.split(",") if x]
        if any(not 0 <= d <= 1 for d in depths):
            raise ValueError("--depths must lie in [0, 1]")
        if args.needles is None:
            args.needles = int(recipe.get("needles", 3))
        if not 1 <= args.needles <= len(NAMES):
            raise ValueError(f"--needles must be in 1..{len(NAMES)}")
        if args.haystack_numbers < 0:
            raise ValueError("--haystack-numbers must be >= 0")
    except ValueError as e:
        print(f"megatron-infini eval needle: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_infini.inference.loader import inference_session, load_model_for_inference

    with inference_session():
        model, cfg, tok = load_model_for_inference(args.checkpoint, overrides=args.overrides)
        results = {}
        for memory in ([True, False] if args.no_memory else [True]):
            key = "on" if memory else "off"
            results[key] = run_needle(model, tok, lengths, depths, args.samples, args.seed, args.key_digits,
                                      args.needles, args.intro, args.chunk_segments, args.batch_size, memory,
                                      args.haystack, log=lambda m: print(m, file=sys.stderr),
                                      haystack_numbers=args.haystack_numbers, random_offsets=not args.fixed_offsets)
            print(format_table(results[key]["table"], f"needle accuracy ({args.needles} keys), memory {key} "
                                                      f"({model.checkpoint_dir})"))
            print(format_distractors(results[key]))
        out = {"checkpoint": model.checkpoint_dir, "segment_length": cfg.model.segment_length,
               "samples": args.samples, "seed": args.seed, "key_digits": args.key_digits, "intro": args.intro,
               "recipe": recipe or None, "needles": args.needles, "haystack": args.haystack or "shipped held-out play",
               "haystack_numbers": args.haystack_numbers, "random_offsets": not args.fixed_offsets,
               "results": results}
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
