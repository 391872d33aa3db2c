"""Context parallelism of Infini-attention: bytes sent and wall time (CPU, gloo).

    python tools/bench_context_parallel.py                      # both tables, defaults below
    python tools/bench_context_parallel.py --lengths 32768 131072 1048576 --time-lengths 16384

1. Bytes sent per layer per step, per rank, by our memory relay against ring attention's K/V
   exchange, at the given sequence lengths. Ours are counted by `CommCounter` inside the real
   code path (`MemoryRelay.attention`, forward + backward) on `--cp` gloo processes. At lengths
   up to `--full-max` the whole layer op runs; beyond it (too slow for a CPU) the relay runs
   with the memory shapes that `ops.memory_delta` gives for the full-length keys/values (meta
   tensors) through the same collectives. Ring attention's bytes are counted from the K/V
   tensor shapes of each rank's block, hop by hop (forward: each rank passes K and V on cp-1
   times; backward: K, V and dK, dV cp-1 times each, a lower bound).
2. Wall time of one Infini attention op, forward + backward, CP=cp (cp processes, 1 thread
   each) vs CP=1 (1 process, 1 thread), median of `--repeats`.

Layer shape: --heads query heads, --kv-heads key/value heads, --head-dim, batch --batch
(defaults: the paper's LM, 8 heads x 128, batch 1).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _qkv(s, b, hq, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, hq, d, generator=g) * 0.5
    k = torch.randn(s, b, hkv, d, generator=g) * 0.5
    v = torch.randn(s, b, hkv, d, generator=g)
    return [t.requires_grad_() for t in (q, k, v)]


def _worker(rank, world, port, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from megatron_infini.ops import memory_delta
        from megatron_infini.parallel import CommCounter, MemoryRelay, pack_memory

        group = dist.new_group(list(range(world)))
        a = args
        lines = []
        # --- bytes, counted in the real code path
        for update in ("linear", "delta"):
            for S in a.lengths:
                counter = CommCounter()
                relay = MemoryRelay(group, tag=1, counter=counter)
                s = S // world
                if S <= a.full_max:
                    q, k, v = _qkv(s, a.batch, a.heads, a.kv_heads, a.head_dim, seed=rank)
                    gate = torch.zeros(a.heads, requires_grad=True)
                    out, _ = relay.attention(q, k, v, gate, segment_length=a.segment, update=update)
                    out.float().square().mean().backward()
                    how = "full op"
                else:  # memory shapes of the real length, same collectives
                    km = torch.empty(s, a.batch, a.kv_heads, a.head_dim, device="meta")
                    shape = pack_memory(*memory_delta(km, km)).shape
                    t = torch.zeros(shape)
                    if update == "linear":
                        relay.all_gather(t, "allgather_fwd")
                        relay.all_gather(t, "allgather_bwd")
                    else:
                        if rank < world - 1:
                            relay.isend(t, rank + 1, relay.tag_fwd, "p2p_fwd")
                        if rank > 0:
                            relay.irecv(torch.empty(shape), rank - 1, relay.tag_fwd).wait()
                            relay.isend(t, rank - 1, relay.tag_bwd, "p2p_bwd")
                        if rank < world - 1:
                            relay.irecv(torch.empty(shape), rank + 1, relay.tag_bwd).wait()
                    how = "relay only"
                relay.flush()
                sent = torch.tensor([counter.bytes_sent], dtype=torch.float64)
                dist.all_reduce(sent, op=dist.ReduceOp.MAX)
                # ring attention: K and V of this rank's block, passed on cp-1 times
                kv = torch.empty(s, a.batch, a.kv_heads, a.head_dim, device="meta", dtype=torch.bfloat16)
                ring_fwd = sum(2 * kv.numel() * kv.element_size() for _ in range(world - 1))
                ring_bwd = 2 * ring_fwd  # K, V and dK, dV, cp-1 hops each
                lines.append((update, S, int(sent.item()), ring_fwd + ring_bwd, ring_fwd, how))
        # --- wall time
        times = []
        for update in ("linear", "delta"):
            for S in a.time_lengths:
                relay = MemoryRelay(group, tag=2)
                q, k, v = _qkv(S // world, a.batch, a.t_heads, a.t_heads, a.t_head_dim, seed=rank)
                gate = torch.zeros(a.t_heads, requires_grad=True)
                ts, cpu = [], []
                for _ in range(a.repeats):
                    dist.barrier(group)
                    t0, c0 = time.perf_counter(), time.process_time()
                    out, _ = relay.attention(q, k, v, gate, segment_length=a.t_segment, update=update)
                    out.square().mean().backward()
                    relay.flush()
                    cpu.append(time.process_time() - c0)
                    dist.barrier(group)
                    ts.append(time.perf_counter() - t0)
                c = torch.tensor([statistics.median(cpu)], dtype=torch.float64)
                dist.all_reduce(c, op=dist.ReduceOp.MAX)  # the busiest rank
                times.append((update, S, statistics.median(ts), c.item()))
        if rank == 0:
            torch.save({"bytes": lines, "times": times}, os.path.join(out_dir, f"cp{world}.pt"))
    finally:
        dist.destroy_process_group()


def _run(world, args, out_dir):
    mp.start_processes(_worker, args=(world, _free_port(), args, out_dir), nprocs=world, start_method="spawn")
    return torch.load(os.path.join(out_dir, f"cp{world}.pt"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 1048576])
    p.add_argument("--full-max", type=int, default=32768, help="longest length run through the whole op")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--segment", type=int, default=2048)
    p.add_argument("--time-lengths", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--t-heads", type=int, default=4)
    p.add_argument("--t-head-dim", type=int, default=64)
    p.add_argument("--t-segment", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as out:
        par = _run(args.cp, args, out)
        args.lengths = []  # the CP=1 run only times
        one = _run(1, args, out)

    print(f"Bytes sent per layer per step per rank (forward + backward), CP={args.cp}, batch {args.batch}, "
          f"{args.heads} heads / {args.kv_heads} kv heads x {args.head_dim}; ours float32 memory, ring bf16 K/V")
    print(f"{'rule':7} {'tokens':>9} {'memory relay':>14} {'ring K/V fwd':>14} {'ring fwd+bwd':>14} {'ratio':>9}  how")
    for update, S, ours, ring, ring_fwd, how in par["bytes"]:
        print(f"{update:7} {S:9d} {ours:14,d} {ring_fwd:14,d} {ring:14,d} {ring / max(ours, 1):9.0f}x  {how}")
    print(f"\nWall time, one attention op forward + backward, {args.t_heads} heads x {args.t_head_dim}, "
          f"segment {args.t_segment}, 1 thread per process (median of {args.repeats})")
    print("wall: elapsed seconds; cpu: CPU seconds of the busiest rank (the per-rank work, unaffected by other\n"
          "load on a shared machine; wall speed-up needs one free core per rank)")
    print(f"{'rule':7} {'tokens':>9} {'CP=1 wall':>10} {f'CP={args.cp} wall':>10} {'CP=1 cpu':>9} "
          f"{f'CP={args.cp} cpu':>9} {'cpu ratio':>9}")
    for (update, S, w_par, c_par), (_, _, w_one, c_one) in zip(par["times"], one["times"]):
        print(f"{update:7} {S:9d} {w_one:10.3f} {w_par:10.3f} {c_one:9.3f} {c_par:9.3f} {c_one / c_par:9.2f}")


if __name__ == "__main__":
    main()
