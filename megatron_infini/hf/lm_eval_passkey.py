"""Write the `infini_passkey` task of lm-evaluation-harness: its YAML and its prompts.

    python -m megatron_infini.hf.lm_eval_passkey --tokenizer EXPORT --out runs/lm_eval_passkey \\
        --lengths 200,300 --depths 0,0.5 --samples 5 --key-digits 5
    lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True,add_bos_token=True \\
        --include_path runs/lm_eval_passkey --tasks infini_passkey --batch_size 4

The prompts are those of `megatron-infini eval passkey` with the same arguments and seed
(`megatron_infini.evaluation.passkey.make_samples`), as text: each one is checked to encode
back to exactly its token ids (BOS added by the tokenizer, `add_bos_token=True` above). The task
generates as many tokens as eval passkey does (the answer's length + 1: keys of a fixed number
of digits, `--key-digits`, so that this is one number) and scores the first integer generated,
so its accuracy is eval passkey's. No download: the data is a local JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def write_task(tokenizer, out_dir: str, lengths, depths, samples: int, seed: int = 0, key_digits: int = 5,
               intro: bool = True) -> str:
    """Write `infini_passkey.jsonl` and `infini_passkey.yaml` into `out_dir`; returns the YAML's path.

    Raises:
        ValueError: a prompt whose text does not encode back to its ids, or answers of
            different lengths (use `key_digits`).
    """
    from megatron_infini.evaluation.passkey import make_samples
    from megatron_infini.evaluation.passkey_data import PasskeyBuilder

    builder = PasskeyBuilder(tokenizer, intro=intro)
    rows, answer_lengths = [], set()
    bos = tokenizer.bos_id >= 0
    for length in lengths:
        for depth in depths:
            for s in make_samples(builder, length, depth, samples, seed, key_digits):
                ids = s.ids[1:] if bos else s.ids
                text = tokenizer.decode(ids)
                if tokenizer.encode(text, bos=bos) != s.ids:
                    raise ValueError(f"passkey prompt (length {length}, depth {depth}) does not encode back to its "
                                     "ids as text; this tokenizer cannot carry the prompts through lm-eval")
                answer_lengths.add(len(s.answer_ids))
                rows.append({"prompt": text, "key": str(s.key), "length": length, "depth": depth})
    if len(answer_lengths) != 1:
        raise ValueError(f"answers of {sorted(answer_lengths)} tokens: eval passkey generates per batch, set "
                         "key_digits so that every answer has the same length")
    os.makedirs(out_dir, exist_ok=True)
    data = os.path.abspath(os.path.join(out_dir, "infini_passkey.jsonl"))
    with open(data, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    with open(os.path.join(HERE, "infini_passkey.yaml"), encoding="utf-8") as fh:
        task = fh.read().replace("@DATA_FILE@", data).replace("@MAX_GEN_TOKS@", str(answer_lengths.pop() + 1))
    path = os.path.join(out_dir, "infini_passkey.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(task)
    return path


def main(argv=None) -> int:
    from megatron_infini.evaluation.passkey import parse_size

    p = argparse.ArgumentParser(prog="python -m megatron_infini.hf.lm_eval_passkey", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="the export (or any tokenizer file or directory)")
    p.add_argument("--out", required=True, help="directory for the task YAML and its data (--include_path)")
    p.add_argument("--lengths", default="1k,4k", help="comma-separated prompt lengths in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=5, help="prompts per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--key-digits", type=int, default=5, help="keys uniform over D-digit numbers")
    p.add_argument("--no-intro", dest="intro", action="store_false", help="leave out the introduction")
    args = p.parse_args(argv)
    from megatron_infini.data.tokenizer import Tokenizer

    try:
        path = write_task(Tokenizer(args.tokenizer), args.out, [parse_size(x) for x in args.lengths.split(",") if x],
                          [float(x) for x in args.depths.split(",") if x], args.samples, args.seed, args.key_digits,
                          args.intro)
    except ValueError as e:
        print(f"lm_eval_passkey: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
