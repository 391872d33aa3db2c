"""Long-document perplexity per segment position, with the memory-off ablation in the same run.

    megatron-infini eval perplexity --checkpoint runs/debug                  # The Tempest (shipped)
    megatron-infini eval perplexity --checkpoint CKPT --data PREFIX|FILE.txt|FILE.jsonl ... \\
        --max-tokens 65536 --json ppl.json

Each document is streamed from its first token in chunks of whole segments with the memory
carried, and the loss of every token is credited to the index of its segment in the document
(0, 1, 2, ...). Segments are grouped in bins of doubling size (0, 1, 2-3, 4-7, ...): if the
memory helps, perplexity with memory falls with the position relative to the ablation, where
every segment starts from an empty memory (it sees only itself, exactly as the first segment
of every training sequence does). `--data` takes preprocessed prefixes (`.bin/.idx`) or raw
text / JSONL files (tokenized here); default: the shipped held-out play.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, Iterator, List, Sequence

import numpy as np
import torch

from megatron_infini.inference.loader import add_dtype_arg


def iter_token_documents(paths: Sequence[str], tokenizer, max_docs: int) -> Iterator[np.ndarray]:
    """Token ids of each document (EOS dropped) from indexed prefixes or text / JSONL files."""
    n = 0
    for path in paths:
        if os.path.isfile(path + ".idx"):
            from megatron_infini.data.preprocess import indexed_dataset_module

            ds = indexed_dataset_module().IndexedDataset(path)
            docs = (np.asarray(ds.get(i), dtype=np.int64) for i in range(len(ds)))
        else:
            from megatron_infini.data.documents import iter_documents, resolve_inputs

            docs = (np.asarray(tokenizer.encode(text, eos=True), dtype=np.int64)
                    for _, text in iter_documents(resolve_inputs([path])))
        for doc in docs:
            if len(doc) and doc[-1] == tokenizer.eos_id:
                doc = doc[:-1]
            if len(doc) < 2:
                continue
            yield doc
            n += 1
            if n >= max_docs:
                return


def segment_bins(num_segments: int) -> List[range]:
    """[0], [1], [2, 3], [4, 7], ... covering 0..num_segments-1."""
    bins, lo = [range(0, 1)], 1
    while lo < num_segments:
        bins.append(range(lo, min(2 * lo, num_segments)))
        lo *= 2
    return bins


@torch.no_grad()
def segment_losses(model, doc: np.ndarray, segment_length: int, chunk_segments: int = 16,
                   memory: bool = True) -> np.ndarray:
    """Summed loss and token count per segment index of one document streamed with the memory
    carried: float64 [num_segments, 2]. Token t (predicting t+1) belongs to segment t // N.
    memory=False: the ablation, every segment starts from an empty memory (segments folded
    into the batch, nothing carried)."""
    from megatron_infini.inference.stream import fold_segments, unwrap
    from megatron_infini.streaming import reset_memory, set_memory_carry

    m = unwrap(model)
    device = next(m.parameters()).device
    N = segment_length
    chunk = chunk_segments * N
    tokens = torch.from_numpy(doc).unsqueeze(0)  # [1, T]
    T = tokens.shape[1] - 1  # predicted positions
    out = np.zeros((-(-T // N), 2), dtype=np.float64)
    set_memory_carry(m, memory)
    try:
        for start in range(0, T, chunk):
            piece = tokens[:, start:min(start + chunk, T) + 1]
            inputs, labels = piece[:, :-1], piece[:, 1:]  # [1, s]
            s = inputs.shape[1]
            if not memory and s > N:  # [1, s] -> [n, N] (+ the short tail as its own call)
                whole = s // N * N
                parts = [(fold_segments(inputs[:, :whole], N), fold_segments(labels[:, :whole], N))]
                if whole < s:
                    parts.append((inputs[:, whole:], labels[:, whole:]))
            else:
                parts = [(inputs, labels)]
            loss = []
            for x, y in parts:
                x, y = x.to(device), y.to(device)
                pos = torch.arange(x.shape[1], device=device).unsqueeze(0).expand_as(x)
                loss.append(m(x, pos, None, labels=y).reshape(-1).double().cpu().numpy())  # [b, s] -> row-major
            loss = np.concatenate(loss)  # [s]
            seg = (start + np.arange(len(loss))) // N
            np.add.at(out[:, 0], seg, loss)
            np.add.at(out[:, 1], seg, 1)
    finally:
        set_memory_carry(m, False)
        reset_memory(m)
    return out


def run_perplexity(model, docs: Sequence[np.ndarray], segment_length: int, chunk_segments: int = 16,
                   ablation: bool = True, log=print) -> dict:
    """Per-bin perplexity with memory (and without, when `ablation`) over `docs`."""
    modes = [("on", True)] + ([("off", False)] if ablation else [])
    totals: Dict[str, np.ndarray] = {}
    for name, memory in modes:
        acc = np.zeros((0, 2))
        t0 = time.perf_counter()
        for doc in docs:
            s = segment_losses(model, doc, segment_length, chunk_segments, memory)
            if len(s) > len(acc):
                acc = np.vstack([acc, np.zeros((len(s) - len(acc), 2))])
            acc[:len(s)] += s
        totals[name] = acc
        if log:
            log(f"[perplexity] memory {name}: {int(acc[:, 1].sum())} tokens in {time.perf_counter() - t0:.1f} s")
    n_seg = len(totals["on"])
    rows = []
    for b in segment_bins(n_seg):
        row = {"segments": [b.start, b.stop - 1], "tokens": int(totals["on"][b.start:b.stop, 1].sum())}
        for name, acc in totals.items():
            loss, cnt = acc[b.start:b.stop, 0].sum(), acc[b.start:b.stop, 1].sum()
            row[f"ppl_memory_{name}"] = math.exp(loss / cnt)
        rows.append(row)
    overall = {f"ppl_memory_{k}": math.exp(v[:, 0].sum() / v[:, 1].sum()) for k, v in totals.items()}
    return {"segment_length": segment_length, "documents": len(docs), "bins": rows, "overall": overall}


def format_rows(res: dict) -> str:
    abl = "ppl_memory_off" in res["overall"]
    head = f"{'segments':>13} | {'tokens':>8} | {'ppl mem on':>10}" + (f" | {'ppl mem off':>11} | {'on/off':>6}" if abl else "")
    lines = [head, "-" * len(head)]
    for r in res["bins"] + [dict(segments=None, tokens=sum(r["tokens"] for r in res["bins"]), **res["overall"])]:
        seg = "all" if r["segments"] is None else (
            f"{r['segments'][0]}" if r["segments"][0] == r["segments"][1] else f"{r['segments'][0]}-{r['segments'][1]}")
        line = f"{seg:>13} | {r['tokens']:>8} | {r['ppl_memory_on']:>10.2f}"
        if abl:
            line += f" | {r['ppl_memory_off']:>11.2f} | {r['ppl_memory_on'] / r['ppl_memory_off']:>6.3f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    from megatron_infini.data import SHAKESPEARE_VALID_PREFIX

    p = argparse.ArgumentParser(prog="megatron-infini eval perplexity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory, its checkpoints/ directory, or an iter_ directory")
    p.add_argument("--data", nargs="+", default=[str(SHAKESPEARE_VALID_PREFIX)],
                   help="indexed prefixes (.bin/.idx) or text / JSONL files; default: the shipped held-out play")
    p.add_argument("--max-docs", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=0, help="read at most this many tokens of each document (0: all)")
    p.add_argument("--chunk-segments", type=int, default=16)
    p.add_argument("--no-ablation", action="store_true", help="skip the memory-off run")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="write the result to this JSON file")
    add_dtype_arg(p)
    p.add_argument("overrides", nargs="*", help="config overrides for the saved config (shape must not change)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_infini.inference.loader import inference_session, load_model_for_inference

    with inference_session():
        model, cfg, tok = load_model_for_inference(args.checkpoint, overrides=args.overrides, dtype=args.dtype)
        docs = list(iter_token_documents(args.data, tok, args.max_docs))
        if not docs:
            print("megatron-infini eval perplexity: no documents with 2 or more tokens", file=sys.stderr)
            return 2
        if args.max_tokens:
            docs = [d[:args.max_tokens + 1] for d in docs]
        res = run_perplexity(model, docs, cfg.model.segment_length, args.chunk_segments, not args.no_ablation,
                             log=lambda m: print(m, file=sys.stderr))
        res["checkpoint"] = model.checkpoint_dir
        res["data"] = args.data
        print(f"perplexity per segment position (N={cfg.model.segment_length}, {len(docs)} documents, "
              f"{model.checkpoint_dir})")
        print(format_rows(res))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
