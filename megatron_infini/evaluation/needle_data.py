"""Needle-in-a-haystack prompts and training documents, as token ids.

    [INTRO] haystack with K named needles inserted, QUESTION about one of them -> " K."

A needle is "The blue pass key is 73. Remember it. 73 is the blue pass key." (K > 1: the
names of NAMES, one per needle) or, with K = 1, the passkey protocol's needle; the question
names the asked needle ("What is the blue pass key? The blue pass key is"). The haystack is
natural text (`haystack_ids`: the shipped held-out play by default, the training plays for
training documents), a window starting at a random line; `numbers=R` sprinkles about R numbers
of the keys' form per 100 haystack tokens (`passkey_data.Haystack`), and `segment_length`
moves the asked needle to a random offset in its segment (the distractors sit at uniform random
positions anyway). `write_needle_data` writes training documents in this format for the
trainer (`megatron-infini eval needle-data`, used by tools/needle_tiny.sh): every document is
one prompt with its answer and EOS, EOS-padded to the training length, so no document relies
on memory carried from another one.

Legend: L prompt tokens, K needles, N segment length.
"""

from __future__ import annotations

import json
import os
import random
from typing import List, Optional, Sequence

from .passkey_data import FILLER, INTRO, NEEDLE, QUESTION, Haystack, PasskeySample, random_key, segment_cut

NAMES = ("blue", "red", "green", "gold", "silver", "black", "white", "grey")
NAMED_NEEDLE = " The {name} pass key is {key}. Remember it. {key} is the {name} pass key."
NAMED_QUESTION = " What is the {name} pass key? The {name} pass key is"


def haystack_ids(tokenizer, path: Optional[str] = None) -> List[int]:
    """Token ids of the haystack text (default: the shipped held-out play), JSONL records
    ({"text"}) joined by blank lines, or a plain text file."""
    from megatron_infini.data import CORPUS_DIR

    path = path or str(CORPUS_DIR / "shakespeare_valid.jsonl")
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".jsonl"):
            text = "\n\n".join(json.loads(line)["text"] for line in fh if line.strip())
        else:
            text = fh.read()
    return tokenizer.encode(text)


def training_haystack_path() -> str:
    """The shipped training plays (never the held-out play the evaluation reads)."""
    from megatron_infini.data import CORPUS_DIR

    return str(CORPUS_DIR / "shakespeare_train.jsonl")


class NeedleBuilder:
    """Prompts of an exact token length: [INTRO] haystack with `needles` keys inserted, question."""

    def __init__(self, tokenizer, haystack: Sequence[int], needles: int = 1, intro: bool = True,
                 numbers: float = 0.0, segment_length: Optional[int] = None):
        if not 1 <= needles <= len(NAMES):
            raise ValueError(f"needles must be in 1..{len(NAMES)}, got {needles}")
        if numbers < 0:
            raise ValueError(f"haystack numbers must be >= 0 per 100 tokens, got {numbers}")
        self.tok = tokenizer
        self.hay = Haystack(tokenizer, haystack)
        self.needles = needles
        self.numbers = numbers
        self.segment_length = segment_length
        bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
        self.intro = tokenizer.encode(INTRO, bos=tokenizer.bos_id >= 0) if intro else bos

    def _needle(self, name: Optional[str], key: int) -> List[int]:
        text = NEEDLE.format(key=key) if name is None else NAMED_NEEDLE.format(name=name, key=key)
        return self.tok.encode(text)

    def fixed_tokens(self, key_digits: Optional[int] = None) -> int:
        """Prompt tokens that are not haystack, for keys of `key_digits` digits (5 if None)."""
        key = 10 ** ((key_digits or 5) - 1)
        name = max(NAMES, key=lambda n: len(self.tok.encode(NAMED_NEEDLE.format(name=n, key=key))))
        question = QUESTION if self.needles == 1 else NAMED_QUESTION.format(name=name)
        return (len(self.intro) + self.needles * len(self._needle(None if self.needles == 1 else name, key))
                + len(self.tok.encode(question)))

    def build(self, length: int, depth: float, rng: random.Random, key_digits: Optional[int] = None) -> PasskeySample:
        """The asked needle after `depth` of the haystack tokens (at a random offset in its
        segment when the builder has a segment length), distractors at random depths."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        keys: List[int] = []
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
        start = rng.choice(self.hay.line_starts)
        hay = self.hay.window(start, n_hay, rng, self.numbers, key_digits, avoid=keys)
        others = [self.hay.snap(hay, rng.randint(0, n_hay)) for _ in needles[1:]]
        nominal = int(round(depth * n_hay))
        base = len(self.intro) + sum(len(needles[i + 1]) for i, c in enumerate(others) if c < nominal)
        # every needle before a word start (never inside a word or a number)
        cuts = [self.hay.snap(hay, segment_cut(nominal, n_hay, base, self.segment_length, rng))] + others
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
        # every needle's start: after the needles at smaller cuts and those at the same cut with a smaller index
        starts = [len(self.intro) + cuts[i] + sum(len(needles[j]) for j in range(len(needles))
                                                  if (cuts[j], j) < (cuts[i], i)) for i in range(len(needles))]
        spans = [(a, a + len(x)) for a, x in zip(starts, needles)]
        assert starts[0] == start_tok and all(ids[a:b] == x for (a, b), x in zip(spans, needles))
        return PasskeySample(ids=ids, key=keys[0], needle_start=start_tok, needle_end=start_tok + len(needles[0]),
                             question_start=len(ids) - len(question), answer_ids=self.tok.encode(f" {keys[0]}."),
                             distractors=keys[1:], needle_spans=spans)


def write_needle_data(prefix: str, tokenizer, length: int, samples: int, needles: int = 2,
                      min_length: Optional[int] = None, key_digits: Optional[int] = 2, intro: bool = False,
                      numbers: float = 3.0, answer_weight: int = 20, text_weight: int = 1, seed: int = 0,
                      haystack: Optional[str] = None, jsonl: bool = True, needle_weight: Optional[int] = None,
                      filler_share: float = 0.0) -> dict:
    """Needle training documents of exactly `length` tokens at `prefix`.{bin,idx,json} (+ `.jsonl`),
    the haystack from the training plays (or `haystack`), and with `answer_weight > 0` their loss
    weights at `prefix`_weights.*: the answer (key digits, period, EOS) weighs `answer_weight`,
    the prompt `text_weight` (its needles `needle_weight`, default `text_weight`: the second
    mention of a key is predictable from the first, which teaches copying the key), the EOS
    padding 0. Each document: prompt + answer + EOS of
    `min_length`..`length` tokens (uniform), the asked needle at a uniform random depth.
    `filler_share`: the share of documents (drawn at random) whose haystack is the passkey
    protocol's repeated filler sentence instead of the plays (a curriculum: the easy haystack
    on which retrieval is learned, beside the natural text it must carry over to)."""
    from .finetune_data import write_prompt_documents

    if not 0.0 <= filler_share <= 1.0:
        raise ValueError(f"filler_share must be in [0, 1], got {filler_share}")
    builder = NeedleBuilder(tokenizer, haystack_ids(tokenizer, haystack or training_haystack_path()), needles,
                            intro, numbers)
    filler = NeedleBuilder(tokenizer, tokenizer.encode(FILLER * 8), needles, intro, numbers) if filler_share else None
    shortest = builder.fixed_tokens(key_digits) + len(tokenizer.encode(f" {10 ** ((key_digits or 5) - 1)}.")) + 1
    min_length = length if min_length is None else min_length
    if not shortest <= min_length <= length:
        raise ValueError(f"min_length must be in {shortest}..length ({length}) for {needles} needle(s), "
                         f"got {min_length}")
    needle_weight = text_weight if needle_weight is None else needle_weight
    if answer_weight < 0 or text_weight < 0 or needle_weight < 0:
        raise ValueError(f"answer_weight, text_weight and needle_weight must be >= 0, got {answer_weight}, "
                         f"{text_weight}, {needle_weight}")
    rng = random.Random(seed)

    def prompts():
        for _ in range(samples):
            doc_len, depth = rng.randint(min_length, length), rng.random()
            b = filler if filler is not None and rng.random() < filler_share else builder
            s = b.build(doc_len - 1 - ((key_digits or 5) + 2), depth, rng, key_digits)  # answer " K." + EOS
            yield s, {"key": s.key, "distractors": s.distractors, "depth": round(depth, 4),
                      **({"haystack": "filler" if b is filler else "text"} if filler is not None else {})}

    return write_prompt_documents(prefix, tokenizer, prompts(), length, answer_weight, text_weight, jsonl,
                                  needle_weight=needle_weight,
                                  note=f"needle L={length} min={min_length} K={needles} digits={key_digits} "
                                       f"numbers={numbers} intro={intro} seed={seed} needle_weight={needle_weight} "
                                       f"filler_share={filler_share}")


def main(argv=None) -> int:
    import argparse
    import sys

    from megatron_infini.data import SHAKESPEARE_TOKENIZER
    from megatron_infini.data.tokenizer import Tokenizer

    from .recipe import parse_size

    p = argparse.ArgumentParser(prog="megatron-infini eval needle-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--length", default="128", help="tokens per document (= train.seq_length)")
    p.add_argument("--min-length", default=None, help="shortest prompt + answer + EOS (EOS-padded to --length)")
    p.add_argument("--samples", type=int, default=48000, help="documents")
    p.add_argument("--needles", type=int, default=2, help="named needles per document (K)")
    p.add_argument("--key-digits", type=int, default=2)
    p.add_argument("--haystack-numbers", type=float, default=3.0,
                   help="numbers of the keys' form per 100 haystack tokens (0: none)")
    p.add_argument("--haystack", default=None, help="text or JSONL file (default: the shipped training plays)")
    p.add_argument("--intro", action="store_true", help="keep the protocol's introduction (default: none)")
    p.add_argument("--answer-weight", type=int, default=20, help="loss weight of the answer (0: no weights file)")
    p.add_argument("--text-weight", type=int, default=1, help="loss weight of prompt tokens")
    p.add_argument("--filler-share", type=float, default=0.0,
                   help="share of documents whose haystack is the passkey filler sentence (a curriculum; default 0)")
    p.add_argument("--needle-weight", type=int, default=None,
                   help="loss weight of the needles' tokens in the prompt (default: --text-weight)")
    p.add_argument("--name", default="needle_train", help="file name prefix inside --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="", help="tokenizer (default: the shipped one)")
    args = p.parse_args(argv)
    try:
        length = parse_size(args.length)
        tok = Tokenizer(args.tokenizer or SHAKESPEARE_TOKENIZER)
        prefix = os.path.join(args.out, args.name)
        meta = write_needle_data(prefix, tok, length, args.samples, args.needles,
                                 parse_size(args.min_length) if args.min_length else None, args.key_digits,
                                 args.intro, args.haystack_numbers, args.answer_weight, args.text_weight, args.seed,
                                 args.haystack, needle_weight=args.needle_weight, filler_share=args.filler_share)
    except ValueError as e:
        print(f"megatron-infini eval needle-data: {e}", file=sys.stderr)
        return 2
    print(f"wrote {prefix}.bin/.idx/.json/.jsonl: {meta['num_documents']} documents of {length} tokens, "
          f"{args.needles} needles each")
    return 0
