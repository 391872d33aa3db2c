#!/usr/bin/env python3
"""Peak memory of the LM head + loss, forward and backward: Megatron's path (full logits, then
`vocab_parallel_cross_entropy`) against the chunked one (`ops.linear_cross_entropy`).

Each case runs in a fresh child process. The child builds bf16 hidden states [n, h], a bf16
output weight [V, h] and labels, notes its resident memory, runs forward + backward, and
reports the growth of its peak resident set (`ru_maxrss`) over that baseline: the memory the
head and loss add (logits, softmax, gradients of hidden and weight). Ratios are after / before
at the same token count, measured in one run.

    python tools/bench_loss_memory.py                                 # CPU, V = 128K, h = 256
    python tools/bench_loss_memory.py --before 1024,2048,4096 --after 1024,2048,4096,8192,32768
    python tools/bench_loss_memory.py --device cuda --before 32768 --after 32768 --hidden 4096

On CUDA the figures are `torch.cuda.max_memory_allocated` over the same baseline.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys


def _peak_mib(device) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB -> MiB


def _case(impl, n, vocab, hidden, chunk, device, queue):
    import torch

    torch.manual_seed(0)
    if impl == "before":  # Megatron's function reads its tensor-parallel group (size 1 here)
        import socket

        import torch.distributed as dist
        from megatron.core import parallel_state

        with socket.socket() as sock:  # a free local port
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1)
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    else:
        from megatron_infini.ops.cross_entropy import linear_cross_entropy
    h = (torch.randn(n, hidden, device=device, dtype=torch.bfloat16) * 0.1).requires_grad_()  # [n, h]
    w = (torch.randn(vocab, hidden, device=device, dtype=torch.bfloat16) * 0.02).requires_grad_()  # [V, h]
    labels = torch.randint(0, vocab, (n,), device=device)
    # touch once at a tiny size, so lazy one-time allocations are in the baseline
    if impl == "before":
        vocab_parallel_cross_entropy((h[:2] @ w.t()).unsqueeze(1), labels[:2].unsqueeze(1)).sum().backward()
    else:
        linear_cross_entropy(h[:2], w, labels[:2], chunk=chunk).sum().backward()
    h.grad = w.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak_mib(device) if device == "cuda" else _current_rss_mib()
    if impl == "before":  # GPTModel: logits [s, b, V] from the output layer, then the loss
        logits = (h @ w.t()).unsqueeze(1)  # [n, 1, V] bf16
        loss = vocab_parallel_cross_entropy(logits, labels.unsqueeze(1)).squeeze(1)  # [n] float32
        del logits
    else:
        loss = linear_cross_entropy(h, w, labels, chunk=chunk)  # [n] float32
    loss.mean().backward()
    peak = _peak_mib(device)
    queue.put({"impl": impl, "tokens": n, "vocab": vocab, "hidden": hidden, "chunk": chunk if impl == "after" else None,
               "extra_mib": round(peak - base, 1), "loss": float(loss.mean())})


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def run(impl, n, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_case, args=(impl, n, args.vocab, args.hidden, args.chunk, args.device, queue))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{impl} at {n} tokens failed (exit code {p.exitcode})")
    return queue.get()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="1024,2048,4096", help="token counts for Megatron's path")
    ap.add_argument("--after", default="1024,2048,4096,8192,32768", help="token counts for the chunked path")
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per chunk of the chunked path")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    before = [int(x) for x in args.before.split(",") if x]
    after = [int(x) for x in args.after.split(",") if x]
    rows = [run("before", n, args) for n in before] + [run("after", n, args) for n in after]
    by = {(r["impl"], r["tokens"]): r for r in rows}
    print(f"LM head + loss, forward + backward, bf16 weights, V={args.vocab}, h={args.hidden}, {args.device}; "
          f"extra peak memory over the inputs (MiB)")
    print(f"{'tokens':>8} {'before':>10} {'after':>10} {'after/before':>13} {'before/token KiB':>17}")
    for n in sorted({r["tokens"] for r in rows}):
        b, a = by.get(("before", n)), by.get(("after", n))
        ratio = f"{a['extra_mib'] / b['extra_mib']:.3f}" if a and b and b["extra_mib"] > 0 else "-"
        per_token = f"{b['extra_mib'] * 1024 / n:.1f}" if b else "-"
        print(f"{n:>8} {b['extra_mib'] if b else '-':>10} {a['extra_mib'] if a else '-':>10} {ratio:>13} {per_token:>17}")
    if before and after:  # the largest 'before' scaled linearly to the largest 'after'
        nb, na = max(before), max(after)
        extrapolated = by[("before", nb)]["extra_mib"] * na / nb
        print(f"before at {na} tokens, extrapolated linearly from {nb}: {extrapolated:.0f} MiB; "
              f"after/before = {by[('after', na)]['extra_mib'] / extrapolated:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
