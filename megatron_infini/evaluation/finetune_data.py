"""`megatron-infini eval passkey-data`: passkey fine-tuning documents (the paper: 400 steps on
5K-token inputs before the 1M-token passkey test).

    megatron-infini eval passkey-data --out data/passkey_ft --length 5k --samples 25600
    megatron-infini train --config CONFIG data.train_data=data/passkey_ft/passkey_train train.seq_length=5120

Each document is one passkey prompt with its answer and EOS, exactly `--length` tokens long,
the needle at a uniform random depth and the key uniform in 1..50000 (or over `--key-digits`
digit numbers). Train with `train.seq_length` equal to `--length` and each training window is
one whole document. Writes OUT/passkey_train.{bin,idx,json} and the text as
OUT/passkey_train.jsonl ({"text", "key", "depth"}) for inspection or other pipelines.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys


def main(argv=None) -> int:
    from megatron_infini.data import SHAKESPEARE_TOKENIZER
    from megatron_infini.data.tokenizer import Tokenizer

    from .passkey import parse_size
    from .passkey_data import PasskeyBuilder, random_key
    from .recall import write_documents

    p = argparse.ArgumentParser(prog="megatron-infini eval passkey-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--length", default="5k", help="tokens per document (= train.seq_length)")
    p.add_argument("--samples", type=int, default=25600, help="documents (400 steps x batch 64 = 25600)")
    p.add_argument("--key-digits", type=int, default=None, help="default: keys in 1..50000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="", help="tokenizer: .model, tokenizer.json or a directory (default: the shipped one)")
    args = p.parse_args(argv)
    tok = Tokenizer(args.tokenizer or SHAKESPEARE_TOKENIZER)
    length = parse_size(args.length)
    builder = PasskeyBuilder(tok)
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, "passkey_train")
    with open(prefix + ".jsonl", "w", encoding="utf-8") as jf:
        def docs():
            for _ in range(args.samples):
                key, depth = random_key(rng, args.key_digits), rng.random()
                answer = builder.answer(key)
                s = builder.build(length - len(answer) - 1, depth, key)
                jf.write(json.dumps({"text": tok.decode(s.ids + answer), "key": key, "depth": round(depth, 4)}) + "\n")
                yield s.ids + answer + [tok.eos_id]

        meta = write_documents(prefix, docs(), tok, note=f"passkey fine-tuning L={length} seed={args.seed}")
    print(f"wrote {prefix}.bin/.idx/.json/.jsonl: {meta['num_documents']} documents of {length} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
