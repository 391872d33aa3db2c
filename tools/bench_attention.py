#!/usr/bin/env python3
"""Benchmark the Infini-attention op against full causal attention and the naive segment loop.

Every case runs in a child process of its own (so peak memory is that case's own) and reports
the median forward+backward time, peak memory, achieved FLOP/s and its share of this machine's
measured matmul rate. The cases of one length are timed round-robin, and each ratio is the
median over rounds of the ratio within a round, so a shared machine's drifts cancel out.

    python tools/bench_attention.py                        # CPU defaults: 2K..32K, fp32
    python tools/bench_attention.py --device cuda --dtype bf16 --lengths 32768,131072
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

IMPLS = ("fast", "naive", "full")
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: str, dtype: str) -> float:
    """Measured dense matmul FLOP/s of this machine (median of 5)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    n = 8192 if device == "cuda" else 4096
    a = torch.randn(n, n, device=device, dtype=dt)
    a @ a
    times = []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        a @ a
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def _worker(conn, args: dict) -> None:
    """One (impl, update, length) case in its own process: warm up, then run one timed
    forward+backward per "go" from the parent, and report its peak memory at "stop"."""
    import resource

    import torch
    import torch.nn.functional as F

    from megatron_infini.flops import causal_attention_flops, infini_attention_flops
    from megatron_infini.ops import infini_attention, infini_attention_naive

    dev, s, b, hq, hkv, d, N = args["device"], args["s"], args["b"], args["hq"], args["hkv"], args["d"], args["N"]
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[args["dtype"]]
    torch.manual_seed(0)
    q = torch.randn(s, b, hq, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(s, b, hkv, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(s, b, hkv, d, device=dev, dtype=dt, requires_grad=True)
    gate = torch.zeros(hq, device=dev, dtype=dt, requires_grad=True)
    impl, update = args["impl"], args["update"]

    def step():
        if impl == "full":  # (b, h, s, d), one causal attention over the whole sequence
            out = F.scaled_dot_product_attention(
                q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                is_causal=True, enable_gqa=hq != hkv,
            )
        else:
            op = infini_attention if impl == "fast" else infini_attention_naive
            out, _ = op(q, k, v, gate, segment_length=N, update=update)
        out.float().square().mean().backward()
        q.grad = k.grad = v.grad = gate.grad = None

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def timed():
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        return time.perf_counter() - t0

    # Warm-up: the first runs also pay for page-faulting fresh allocations in (a second one
    # for cases short enough to afford it).
    if timed() < 5.0:
        timed()
    conn.send("ready")
    while conn.recv() == "go":
        conn.send(timed())
    if dev == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    if impl == "full":
        fwd = causal_attention_flops(s, b, hq, d, d)
    else:
        fwd = infini_attention_flops(s, b, hq, hkv, d, d, N, update)
    conn.send(dict(peak_bytes=peak, flops=3 * fwd))


def run_interleaved(cases: list, repeats: int, budget_s: float) -> list:
    """Run the cases of one length round-robin, one process each (started one after the
    other, so warm-ups don't overlap): round r times every case once, so cases compared in
    a ratio are timed seconds apart and slow drifts of a shared machine hit them alike."""
    ctx = mp.get_context("spawn")
    workers = []
    try:
        for case in cases:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, case), daemon=True)
            proc.start()
            if parent.recv() != "ready":
                raise RuntimeError(f"benchmark worker failed: {case}")
            workers.append((proc, parent))
        rounds = []
        deadline = time.perf_counter() + budget_s
        for _ in range(repeats):
            row = []
            for _, conn in workers:
                conn.send("go")
                row.append(conn.recv())
            rounds.append(row)
            if time.perf_counter() > deadline:
                break
        results = []
        for i, (case, (proc, conn)) in enumerate(zip(cases, workers)):
            conn.send("stop")
            info = conn.recv()
            times = [row[i] for row in rounds]
            t = statistics.median(times)
            results.append(dict(case, **info, time_s=t, times_s=times, runs=len(times), flops_per_s=info["flops"] / t))
        return results
    finally:
        for proc, _ in workers:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--lengths", default="2048,8192,32768", help="comma-separated sequence lengths")
    p.add_argument("--updates", default="linear,delta")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {IMPLS}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--segment", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=300.0, help="stop adding rounds at a length after this long")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--malloc", default="tuned", choices=["tuned", "default"],
                   help="tuned (default): every case runs with GLIBC_TUNABLES raising glibc's mmap/trim "
                        "thresholds, so tensors of 64 MB and more are reused instead of being page-faulted "
                        "in again on every allocation (what jemalloc/tcmalloc do for CPU training); "
                        "default: the system allocator as is")
    a = p.parse_args(argv)
    dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    lengths = [int(x) for x in a.lengths.split(",")]
    impls = a.impls.split(",")
    updates = a.updates.split(",")
    for impl in impls:
        if impl not in IMPLS:
            p.error(f"--impls: unknown {impl!r}, choose from {IMPLS}")

    if a.malloc == "tuned" and a.device == "cpu":  # read at process start: the spawned cases inherit it
        os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    peak = matmul_rate(a.device, dtype)
    name = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}, {dtype}; measured matmul rate {peak / 1e9:.1f} GFLOP/s; "
          f"malloc {a.malloc}" + (f" (GLIBC_TUNABLES={MALLOC_TUNABLES})" if a.malloc == "tuned" else ""))
    print(f"# b={a.batch} hq={a.heads} hkv={a.kv_heads or a.heads} d={a.head_dim} segment={a.segment}; "
          "forward+backward, median of repeats, cases of a length timed round-robin, each in its own process")

    results = []
    for s in lengths:
        cases = [dict(device=a.device, dtype=dtype, s=s, b=a.batch, hq=a.heads, hkv=a.kv_heads or a.heads,
                      d=a.head_dim, N=a.segment, impl=impl, update=update)
                 for impl in impls for update in (updates if impl != "full" else ["-"])]
        for r in run_interleaved(cases, a.repeats, a.budget_s):
            r["share_of_matmul"] = r["flops_per_s"] / peak
            results.append(r)
            print(f"  s={s:>7} {r['impl']:>5} {r['update']:>6}: {r['time_s'] * 1e3:10.1f} ms  "
                  f"peak {r['peak_bytes'] / 2**20:8.1f} MiB  {r['flops_per_s'] / 1e9:7.1f} GFLOP/s "
                  f"({100 * r['share_of_matmul']:4.1f}% of matmul), {r['runs']} runs", flush=True)

    def case(s, impl, update):
        for r in results:
            if r["s"] == s and r["impl"] == impl and r["update"] in (update, "-"):
                return r
        return None

    def t(s, impl, update):
        r = case(s, impl, update)
        return r["time_s"] if r else None

    def ratio(s, impl, update):
        """Median over rounds of t(impl) / t(fast): both timed in the same round."""
        r, f = case(s, impl, update), case(s, "fast", update)
        if not r or not f:
            return "-"
        return f"{statistics.median(x / y for x, y in zip(r['times_s'], f['times_s'])):.1f}x"

    print("\n| length | update | fast (ms) | naive (ms) | full causal (ms) | full / fast | naive / fast |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for s in lengths:
        for update in updates:
            fmt = lambda x: f"{x * 1e3:.0f}" if x else "-"
            print(f"| {s} | {update} | {fmt(t(s, 'fast', update))} | {fmt(t(s, 'naive', update))} | "
                  f"{fmt(t(s, 'full', update))} | {ratio(s, 'full', update)} | {ratio(s, 'naive', update)} |")
    print("(ratios: median over rounds of the per-round ratio)")
    if "fast" in impls:
        for lo, hi in zip(lengths, lengths[1:]):
            for update in updates:
                if t(lo, "fast", update) and t(hi, "fast", update):
                    growth = t(hi, "fast", update) / t(lo, "fast", update)
                    print(f"fast {update}: t({hi})/t({lo}) = {growth:.2f} (linear would be {hi / lo:.1f})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(matmul_flops_per_s=peak, device=name, results=results), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
