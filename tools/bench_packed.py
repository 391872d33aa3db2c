#!/usr/bin/env python3
"""Benchmark packed documents: the op with `cu_seqlens` against the same input unpacked.

One input of --length tokens holds documents of random lengths (uniform in 1 .. 2 * --mean-doc
- 1, the last one cut to fit); forward + backward of `ops.infini_attention` is timed with the
documents packed (cu_seqlens: each document alone) and without (one sequence), round-robin,
and the ratio is the median over rounds of the ratio within a round (a shared machine's drifts
cancel out). Padded rows: the packed op lays every document's segments out padded to whole
segments (`ops.packed`), so it computes on n * N rows for s tokens.

    python tools/bench_packed.py                                   # CPU: 32K tokens, docs ~2K
    python tools/bench_packed.py --device cuda --dtype bf16 --segment-length 2048
    python tools/bench_packed.py --clock cpu                       # shared machine: CPU time, 1 thread
"""

from __future__ import annotations

import argparse
import statistics
import time


def doc_lengths(total: int, mean: int, seed: int) -> list:
    """Random document lengths summing to `total` (uniform in 1 .. 2 * mean - 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out, left = [], total
    while left > 0:
        n = min(left, int(torch.randint(1, 2 * mean, (1,), generator=g)))
        out.append(n)
        left -= n
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=32768, help="tokens of the packed input")
    p.add_argument("--mean-doc", type=int, default=2048, help="mean document length")
    p.add_argument("--segment-length", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--update", choices=("linear", "delta"), default="linear")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the process's CPU time (time.process_time) with one torch thread, far less "
                        "sensitive than wall time to other jobs on a shared machine (CPU only)")
    args = p.parse_args(argv)

    import torch

    from megatron_infini.ops import infini_attention
    from megatron_infini.ops.packed import packed_layout

    dev, dt = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.clock == "cpu":
        if dev != "cpu":
            p.error("--clock cpu measures CPU time: use it with --device cpu")
        torch.set_num_threads(1)  # no idle spinning of other threads counted as work
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    s, hq, hkv, d = args.length, args.heads, args.kv_heads, args.head_dim
    lengths = doc_lengths(s, args.mean_doc, args.seed)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    layout = packed_layout(cu, s, 1, args.segment_length)
    g = torch.Generator(device=dev).manual_seed(args.seed)
    q, k, v = (torch.randn(s, 1, h, d, generator=g, device=dev, dtype=dt).requires_grad_()
               for h in (hq, hkv, hkv))
    gate = torch.zeros(hq, device=dev, requires_grad=True)
    grad = torch.randn(s, 1, hq, d, generator=g, device=dev, dtype=dt)

    def run(packed: bool) -> float:
        kw = dict(segment_length=args.segment_length, update=args.update, cu_seqlens=cu if packed else None)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        out, _ = infini_attention(q, k, v, gate, **kw)
        out.backward(grad)
        if dev == "cuda":
            torch.cuda.synchronize()
        return clock() - t0

    run(False), run(True)  # warm-up
    times = {False: [], True: []}
    ratios = []
    for _ in range(args.rounds):
        t = {packed: run(packed) for packed in (False, True)}
        for key in t:
            times[key].append(t[key])
        ratios.append(t[True] / t[False])
    print(f"{s} tokens, {len(lengths)} documents (mean {s / len(lengths):.0f}), segment {args.segment_length}, "
          f"{args.update}, hq {hq} hkv {hkv} d {d}, {args.dtype} on {dev}; padded layout {layout.n} segments of "
          f"{layout.N} = {layout.n * layout.N / s:.2f}x the tokens")
    print(f"forward+backward median ({args.clock} time): unpacked {statistics.median(times[False]) * 1e3:.3f} ms, "
          f"packed (cu_seqlens) {statistics.median(times[True]) * 1e3:.3f} ms, "
          f"ratio {statistics.median(ratios):.2f}x (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
