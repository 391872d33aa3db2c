"""`megatron-infini generate`: stream a prompt of any length through a checkpoint, then generate.

    megatron-infini generate --checkpoint runs/debug --prompt-file book.txt --max-new-tokens 64
    megatron-infini generate --checkpoint runs/debug --random-prompt-tokens 1048576 --max-new-tokens 8

The prompt is read segment by segment with each layer's memory carried (peak memory does not
grow with its length); `--random-prompt-tokens N` streams N random ids made piece by piece (for
memory and speed checks). Prints the generated text and a stats line (tokens/s of the prefill
and of generation, peak resident memory); `--json OUT` writes the same as JSON.
Greedy by default; `--temperature T --top-p P` for nucleus sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Iterator

import torch

from megatron_infini.inference.loader import add_dtype_arg


def parse_args(argv):
    p = argparse.ArgumentParser(prog="megatron-infini generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory, its checkpoints/ directory, or an iter_ directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-file", help="text file holding the prompt")
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--random-prompt-tokens", type=int, help="stream this many random token ids instead of text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and of --random-prompt-tokens")
    p.add_argument("--chunk-segments", type=int, default=16, help="whole segments per forward call while reading")
    p.add_argument("--no-memory", action="store_true", help="ablation: every segment starts from an empty memory")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", help="write the result and stats to this JSON file")
    add_dtype_arg(p)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.segment_length=128 (shape must not change)")
    return p.parse_args(argv)


def random_pieces(n: int, vocab: int, piece: int, seed: int) -> Iterator[torch.Tensor]:
    """n random ids in [0, vocab) as [1, <= piece] tensors, made lazily (never all at once)."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, piece):
        yield torch.randint(0, vocab, (1, min(piece, n - start)), generator=g)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_infini.inference.loader import inference_session, load_model_for_inference
    from megatron_infini.inference.stream import StreamingLM, memory_numbers

    with inference_session():
        model, cfg, tok = load_model_for_inference(args.checkpoint, overrides=args.overrides, dtype=args.dtype)
        lm = StreamingLM(model, chunk_segments=args.chunk_segments, vocab_limit=tok.vocab_size,
                         memory=not args.no_memory)
        if args.random_prompt_tokens is not None:
            if args.random_prompt_tokens < 1:
                print("megatron-infini generate: --random-prompt-tokens must be >= 1", file=sys.stderr)
                return 2
            n_prompt = args.random_prompt_tokens
            prompt = random_pieces(n_prompt, tok.vocab_size, lm.chunk, args.seed)
        else:
            text = open(args.prompt_file, encoding="utf-8").read() if args.prompt_file else args.prompt
            ids = tok.encode(text, bos=tok.bos_id >= 0)
            n_prompt = len(ids)
            prompt = torch.tensor([ids], dtype=torch.long)
        gen = torch.Generator().manual_seed(args.seed)
        rss_loaded = current_rss_mib()
        t0 = time.perf_counter()
        lm.feed(prompt)
        t1 = time.perf_counter()
        new = lm.generate(args.max_new_tokens, args.temperature, args.top_p, eos_id=tok.eos_id, generator=gen)
        t2 = time.perf_counter()
        k = new.shape[1]
        stats = {
            "checkpoint": model.checkpoint_dir,
            "prompt_tokens": n_prompt,
            "new_tokens": k,
            "segment_length": lm.N,
            "chunk_segments": args.chunk_segments,
            "memory": "off" if args.no_memory else "on",
            "prefill_s": round(t1 - t0, 3),
            "prefill_tokens_per_s": round(n_prompt / max(t1 - t0, 1e-9), 1),
            "generate_s": round(t2 - t1, 3),
            "generate_tokens_per_s": round(k / max(t2 - t1, 1e-9), 2),
            "memory_state_floats": memory_numbers(model),
            "rss_before_prompt_mib": round(rss_loaded, 1),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "threads": torch.get_num_threads(),
        }
        text = tok.decode(new[0].tolist())
        print(text)
        print("[generate] " + " ".join(f"{k}={v}" for k, v in stats.items()), file=sys.stderr)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"text": text, "ids": new[0].tolist(), **stats}, fh, indent=1)
        lm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
