"""Cut the shipped training plays into short documents (2-39 lines each) and preprocess them:
the corpus of the document-reset comparison in docs/data.md, where every training window holds
several documents.

    python tools/short_documents.py --output-prefix data/short_plays   # -> .bin/.idx/.json/.jsonl
    python tools/short_documents.py --output-prefix data/short --plays 1 --max-docs 100
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import numpy as np


def cut_plays(plays: List[str], seed: int = 0, max_docs: Optional[int] = None) -> List[str]:
    """Consecutive runs of 2-39 lines of each play (lengths drawn with numpy seed `seed`)."""
    rng = np.random.default_rng(seed)
    docs: List[str] = []
    for play in plays:
        lines, i = play.splitlines(), 0
        while i < len(lines) and (max_docs is None or len(docs) < max_docs):
            n = int(rng.integers(2, 40))
            text = "\n".join(lines[i:i + n])
            i += n
            if text.strip():
                docs.append(text)
    return docs


def make_short_documents(output_prefix: str, plays: Optional[int] = None, max_docs: Optional[int] = None,
                         seed: int = 0) -> dict:
    """Writes `{output_prefix}.jsonl` and its shards (shipped tokenizer); returns the metadata."""
    from megatron_infini.data import CORPUS_DIR, SHAKESPEARE_TOKENIZER
    from megatron_infini.data.preprocess import preprocess

    with open(CORPUS_DIR / "shakespeare_train.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:plays]
    docs = cut_plays(texts, seed, max_docs)
    with open(output_prefix + ".jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    return preprocess([output_prefix + ".jsonl"], SHAKESPEARE_TOKENIZER, output_prefix, log=None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--plays", type=int, default=None, help="use the first N plays (default: all 7)")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    meta = make_short_documents(args.output_prefix, args.plays, args.max_docs, args.seed)
    print(f"{meta['num_documents']} documents, {meta['num_tokens']} tokens "
          f"({meta['num_tokens'] / meta['num_documents']:.0f} per document) -> {args.output_prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
