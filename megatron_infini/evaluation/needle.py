"""Needle in a haystack: a key hidden in natural text among distractor keys, one key asked.

    megatron-infini eval needle --checkpoint runs/x --lengths 4k,32k --depths 0,0.5,1 --needles 3 \\
        --samples 5 --no-memory --json needle.json

Harder than `eval passkey` in two ways: the haystack is the held-out play shipped in
megatron_infini/data/corpus (The Tempest, 34K tokens, a window starting at a random line;
repeated when a prompt is longer), not a repeated filler sentence the memory can learn; and
with `--needles K` > 1 the prompt holds K keys with different names ("The blue pass key is
K. Remember it. K is the blue pass key."), the asked one at the given depth and the others at
random depths, and the question names one ("What is the blue pass key? The blue pass key
is"). With `--needles 1` the needle and question are exactly the passkey protocol's. Same
streaming machinery (`passkey.score_samples`), same table and JSON shape as `eval passkey`
(plus "needles" and "haystack"); the checkpoint's passkey_recipe.json sets the key digits and
the introduction as for `eval passkey`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Dict, List, Optional, Sequence

import torch

from .passkey_data import INTRO, NEEDLE, QUESTION, PasskeySample, random_key

NAMES = ("blue", "red", "green", "gold", "silver", "black", "white", "grey")
NAMED_NEEDLE = " The {name} pass key is {key}. Remember it. {key} is the {name} pass key."
NAMED_QUESTION = " What is the {name} pass key? The {name} pass key is"


def haystack_ids(tokenizer, path: Optional[str] = None) -> List[int]:
    """Token ids of the haystack text (default: the shipped held-out play)."""
    from megatron_infini.data import CORPUS_DIR

    path = path or str(CORPUS_DIR / "shakespeare_valid.jsonl")
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".jsonl"):
            text = "\n\n".join(json.loads(line)["text"] for line in fh if line.strip())
        else:
            text = fh.read()
    return tokenizer.encode(text)


class NeedleBuilder:
    """Prompts of an exact token length: [INTRO] haystack with `needles` keys inserted, question."""

    def __init__(self, tokenizer, haystack: Sequence[int], needles: int = 1, intro: bool = True):
        if not 1 <= needles <= len(NAMES):
            raise ValueError(f"needles must be in 1..{len(NAMES)}, got {needles}")
        if len(haystack) < 2:
            raise ValueError("the haystack text is empty")
        self.tok = tokenizer
        self.hay = list(haystack)
        self.needles = needles
        bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
        self.intro = tokenizer.encode(INTRO, bos=tokenizer.bos_id >= 0) if intro else bos
        self.line_starts = [i for i, t in enumerate(self.hay) if "\n" in tokenizer.decode([t])] or [0]

    def _needle(self, name: Optional[str], key: int) -> List[int]:
        text = NEEDLE.format(key=key) if name is None else NAMED_NEEDLE.format(name=name, key=key)
        return self.tok.encode(text)

    def build(self, length: int, depth: float, rng: random.Random, key_digits: Optional[int] = None) -> PasskeySample:
        """The asked needle after `depth` of the haystack tokens, distractors at random depths."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        keys = []
        while len(keys) < self.needles:  # distinct keys
            k = random_key(rng, key_digits)
            if k not in keys:
                keys.append(k)
        names = rng.sample(NAMES, self.needles) if self.needles > 1 else [None]
        needles = [self._needle(n, k) for n, k in zip(names, keys)]
        question = self.tok.encode(QUESTION if names[0] is None else NAMED_QUESTION.format(name=names[0]))
        n_hay = length - len(self.intro) - sum(len(x) for x in needles) - len(question)
        if n_hay < 0:
            raise ValueError(f"length {length} is too short for {self.needles} needle(s)")
        start = rng.choice(self.line_starts) + 1
        reps = -(-(start + n_hay) // len(self.hay))
        hay = (self.hay * reps)[start:start + n_hay]
        cuts = [int(round(depth * n_hay))] + [rng.randint(0, n_hay) for _ in needles[1:]]
        # insert from the deepest cut backwards so earlier cut positions stay valid
        order = sorted(range(len(needles)), key=lambda i: (cuts[i], i), reverse=True)
        body = list(hay)
        for i in order:
            body[cuts[i]:cuts[i]] = needles[i]
        ids = self.intro + body + question
        # position of the asked needle: after every needle inserted at a smaller cut (or same cut, later index)
        before = sum(len(needles[i]) for i in range(1, len(needles)) if cuts[i] < cuts[0])
        start_tok = len(self.intro) + cuts[0] + before
        assert ids[start_tok:start_tok + len(needles[0])] == needles[0]
        return PasskeySample(ids=ids, key=keys[0], needle_start=start_tok, needle_end=start_tok + len(needles[0]),
                             question_start=len(ids) - len(question), answer_ids=self.tok.encode(f" {keys[0]}."))


def run_needle(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], samples: int, seed: int = 0,
               key_digits: Optional[int] = None, needles: int = 1, intro: bool = True, chunk_segments: int = 16,
               batch_size: int = 16, memory: bool = True, haystack: Optional[str] = None, log=print) -> Dict[str, dict]:
    """{"table": {"{length}": {"{depth}": accuracy}}, "cells": [...]}, as `passkey.run_passkey`."""
    from .passkey import score_grid

    builder = NeedleBuilder(tokenizer, haystack_ids(tokenizer, haystack), needles, intro)

    def make_group(length, depth):
        rng = random.Random(f"{seed}-{length}-{depth}-needle")
        return [builder.build(length, depth, rng, key_digits) for _ in range(samples)]

    return score_grid(model, tokenizer, lengths, depths, make_group, chunk_segments, batch_size, memory, log,
                      tag="needle")


def main(argv=None) -> int:
    from .passkey import add_common_args, apply_recipe, format_table
    from .recipe import parse_lengths

    p = argparse.ArgumentParser(prog="megatron-infini eval needle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--lengths", default="1k,4k", help="prompt lengths in tokens, or multiples of the recipe's T")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="depths in [0, 1] of the asked needle")
    p.add_argument("--needles", type=int, default=3, help="keys in each prompt (1: the passkey needle alone)")
    p.add_argument("--samples", type=int, default=5, help="prompts per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--key-digits", type=int, default=None, help="default: the recipe's, else keys 1..50000")
    p.add_argument("--haystack", default=None, help="text or JSONL ({'text'}) file (default: the held-out play)")
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
        if not 1 <= args.needles <= len(NAMES):
            raise ValueError(f"--needles must be in 1..{len(NAMES)}")
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
                                      args.haystack, log=lambda m: print(m, file=sys.stderr))
            print(format_table(results[key]["table"], f"needle accuracy ({args.needles} keys), memory {key} "
                                                      f"({model.checkpoint_dir})"))
        out = {"checkpoint": model.checkpoint_dir, "segment_length": cfg.model.segment_length,
               "samples": args.samples, "seed": args.seed, "key_digits": args.key_digits, "intro": args.intro,
               "recipe": recipe or None, "needles": args.needles, "haystack": args.haystack or "shipped held-out play",
               "results": results}
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
