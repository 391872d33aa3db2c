"""`megatron-infini eval passkey-data`: passkey fine-tuning documents (the paper: 400 steps on
5K-token inputs before the 1M-token passkey test).

    megatron-infini eval passkey-data --out data/passkey_ft --length 5k --samples 25600
    megatron-infini train --config CONFIG data.train_data=data/passkey_ft/passkey_train train.seq_length=5120

Each document is one passkey prompt with its answer and EOS, exactly `--length` tokens long,
the needle at a uniform random depth and the key uniform in 1..50000 (or over `--key-digits`
digit numbers). Train with `train.seq_length` equal to `--length` and each training window is
one whole document. Writes OUT/passkey_train.{bin,idx,json} and the text as
OUT/passkey_train.jsonl ({"text", "key", "depth", "length"}) for inspection or other pipelines.

Mixed lengths: with `--min-length L0` the prompt + answer + EOS of each document is
uniformly L0..`--length` tokens long, and EOS padding fills the document up to `--length`
(padding comes after the answer, so causal attention and the memory never read it for the
answer). Loss weights: with `--answer-weight W` the per-token loss weights are written too,
as OUT/passkey_train_weights.{bin,idx} (train with
`data.train_loss_weights=OUT/passkey_train_weights`): W on the answer (key digits, period,
EOS), `--text-weight` on the prompt, 0 on padding.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Iterable, Optional, Tuple

from .passkey_data import PasskeySample


def write_passkey_data(prefix: str, tokenizer, length: int, samples: int, min_length: Optional[int] = None,
                       key_digits: Optional[int] = None, intro: bool = True, answer_weight: float = 0.0,
                       text_weight: float = 1.0, seed: int = 0, jsonl: bool = True) -> dict:
    """Passkey documents of exactly `length` tokens at `prefix`.{bin,idx,json} (+ `.jsonl`),
    and with `answer_weight > 0` their loss weights at `prefix`_weights.{bin,idx,json}.
    Returns the metadata of the token shards."""
    from .passkey_data import PasskeyBuilder, random_key

    if min_length is not None and not 0 < min_length <= length:
        raise ValueError(f"min_length must be in 1..length ({length}), got {min_length}")
    if answer_weight < 0 or text_weight < 0 or answer_weight != int(answer_weight) or text_weight != int(text_weight):
        raise ValueError(f"answer_weight and text_weight must be integers >= 0, got {answer_weight}, {text_weight}")
    builder = PasskeyBuilder(tokenizer, intro=intro)
    rng = random.Random(seed)

    def prompts():
        for _ in range(samples):
            key, depth = random_key(rng, key_digits), rng.random()
            doc_len = length if min_length is None else rng.randint(min_length, length)
            s = builder.build(doc_len - len(builder.answer(key)) - 1, depth, key)
            yield s, {"key": key, "depth": round(depth, 4)}

    return write_prompt_documents(prefix, tokenizer, prompts(), length, answer_weight, text_weight, jsonl,
                                  note=f"passkey L={length} min={min_length} digits={key_digits} intro={intro} "
                                       f"seed={seed}")


def write_prompt_documents(prefix: str, tokenizer, prompts: Iterable[Tuple[PasskeySample, dict]], length: int,
                           answer_weight: float, text_weight: float, jsonl: bool, note: str,
                           needle_weight: Optional[float] = None) -> dict:
    """Prompt + answer + EOS, EOS-padded to `length` tokens, for each (sample, record) of
    `prompts`, at `prefix`.{bin,idx,json}; the text with `record` as `prefix`.jsonl; with
    `answer_weight` > 0 the loss weights at `prefix`_weights.* (answer and its EOS
    `answer_weight`, prompt `text_weight`, the needles in it (`PasskeySample.needle_spans`)
    `needle_weight` when given, padding 0). Returns the token shards' metadata."""
    from .recall import write_documents

    eos = tokenizer.eos_id
    weights = []  # per document, when answer_weight > 0
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    jf = open(prefix + ".jsonl", "w", encoding="utf-8") if jsonl else None
    try:
        def docs():
            for s, record in prompts:
                doc_len = len(s.ids) + len(s.answer_ids) + 1
                if doc_len > length:
                    raise ValueError(f"a prompt of {len(s.ids)} tokens does not fit in {length} with its answer")
                if jf is not None:
                    jf.write(json.dumps({"text": tokenizer.decode(s.ids + s.answer_ids), **record,
                                         "length": doc_len}) + "\n")
                if answer_weight:
                    prompt = [int(text_weight)] * len(s.ids)
                    if needle_weight is not None:
                        for a, b in s.needle_spans or [(s.needle_start, s.needle_end)]:
                            prompt[a:b] = [int(needle_weight)] * (b - a)
                    weights.append(prompt + [int(answer_weight)] * (len(s.answer_ids) + 1) + [0] * (length - doc_len))
                yield s.ids + s.answer_ids + [eos] * (length - doc_len + 1)

        meta = write_documents(prefix, docs(), tokenizer, note=note)
    finally:
        if jf is not None:
            jf.close()
    if answer_weight:
        write_documents(prefix + "_weights", iter(weights), tokenizer,
                        note=f"loss weights of {prefix}: answer {answer_weight}, text {text_weight}, padding 0")
    return meta


def main(argv=None) -> int:
    from megatron_infini.data import SHAKESPEARE_TOKENIZER
    from megatron_infini.data.tokenizer import Tokenizer

    from .passkey import parse_size

    p = argparse.ArgumentParser(prog="megatron-infini eval passkey-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--length", default="5k", help="tokens per document (= train.seq_length)")
    p.add_argument("--min-length", default=None,
                   help="mixed lengths: prompts of min-length..length tokens, EOS-padded to --length")
    p.add_argument("--samples", type=int, default=25600, help="documents (400 steps x batch 64 = 25600)")
    p.add_argument("--key-digits", type=int, default=None, help="default: keys in 1..50000")
    p.add_argument("--no-intro", action="store_true", help="leave out the protocol's introduction")
    p.add_argument("--answer-weight", type=int, default=0,
                   help="write per-token loss weights: this on the answer (0: no weights file)")
    p.add_argument("--text-weight", type=int, default=1, help="loss weight of prompt tokens (with --answer-weight)")
    p.add_argument("--name", default="passkey_train", help="file name prefix inside --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="", help="tokenizer: .model, tokenizer.json or a directory (default: the shipped one)")
    args = p.parse_args(argv)
    try:
        length = parse_size(args.length)
        min_length = parse_size(args.min_length) if args.min_length else None
        tok = Tokenizer(args.tokenizer or SHAKESPEARE_TOKENIZER)
        prefix = os.path.join(args.out, args.name)
        meta = write_passkey_data(prefix, tok, length, args.samples, min_length, args.key_digits,
                                  not args.no_intro, args.answer_weight, args.text_weight, args.seed)
    except ValueError as e:
        print(f"megatron-infini eval passkey-data: {e}", file=sys.stderr)
        return 2
    extra = f" and loss weights {prefix}_weights.*" if args.answer_weight else ""
    print(f"wrote {prefix}.bin/.idx/.json/.jsonl: {meta['num_documents']} documents of {length} tokens{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
