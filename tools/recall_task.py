"""Synthetic recall task: prove on CPU that the Infini memory carries a fact across segments.

    # 1. data: whole passkey documents of 128 tokens, the key >= 4 segments (of 16) before the question
    python tools/recall_task.py data --out runs/recall/data
    # 2. train the tiny model through the normal trainer (2 CPU processes, a few minutes)
    torchrun --nproc-per-node 2 -m megatron_infini.train --config configs/recall.yaml
    # 3. memory on vs memory off on held-out prompts, streamed one segment per forward call
    python tools/recall_task.py eval --checkpoint runs/recall --samples 200 --json runs/recall/recall.json

See megatron_infini/evaluation/recall.py for the task and the ablation.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write train/valid shards of recall documents")
    d.add_argument("--out", default="runs/recall/data", help="writes OUT/train.* and OUT/valid.*")
    d.add_argument("--seq-length", type=int, default=128)
    d.add_argument("--segment-length", type=int, default=16)
    d.add_argument("--min-back", type=int, default=4, help="segments between the needle and the question")
    d.add_argument("--digits", type=int, default=2, help="digits of the key")
    d.add_argument("--train-samples", type=int, default=20000)
    d.add_argument("--valid-samples", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--intro", action="store_true", help="start with the passkey protocol's introduction")
    d.add_argument("--tokenizer", default="", help="tokenizer: .model, tokenizer.json or a directory (default: the shipped one)")
    e = sub.add_parser("eval", help="accuracy with memory on vs off")
    e.add_argument("--checkpoint", required=True, help="run directory, its checkpoints/ directory, or an iter_ directory")
    e.add_argument("--samples", type=int, default=200)
    e.add_argument("--min-back", type=int, default=4)
    e.add_argument("--digits", type=int, default=2)
    e.add_argument("--seed", type=int, default=12345, help="held-out prompts (training used --seed 0)")
    e.add_argument("--chunk-segments", type=int, default=1, help="segments per forward call (1: the hardest case)")
    e.add_argument("--intro", action="store_true", help="prompts start with the protocol's introduction")
    e.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)

    from megatron_infini.data import SHAKESPEARE_TOKENIZER
    from megatron_infini.data.tokenizer import Tokenizer
    from megatron_infini.evaluation.recall import evaluate_recall, write_recall_data

    if args.cmd == "data":
        tok = Tokenizer(args.tokenizer or SHAKESPEARE_TOKENIZER)
        meta = write_recall_data(args.out, tok, args.seq_length, args.segment_length, args.train_samples,
                                 args.valid_samples, args.min_back, args.digits, args.seed, args.intro)
        for split, m in meta.items():
            print(f"wrote {args.out}/{split}.bin/.idx/.json: {m['num_documents']} documents, {m['num_tokens']} tokens")
        return 0

    from megatron_infini.inference.loader import inference_session, load_model_for_inference

    with inference_session():
        model, cfg, tok = load_model_for_inference(args.checkpoint)
        res = evaluate_recall(model, cfg, tok, args.samples, args.min_back, args.digits, args.seed,
                              args.chunk_segments, args.intro)
    res["checkpoint"] = model.checkpoint_dir
    on, off = res["memory_on"], res["memory_off"]
    print(f"recall: key >= {res['min_segments_back']} segments back (mean {res['mean_segments_back']:.1f}), "
          f"{on['samples']} held-out prompts, chance {res['chance']:.1%}")
    print(f"  memory on : {on['accuracy']:.1%} ({on['correct']}/{on['samples']})")
    print(f"  memory off: {off['accuracy']:.1%} ({off['correct']}/{off['samples']})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
