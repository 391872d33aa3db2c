"""Memory footprint of the Infini memory vs Transformer-XL, Memorizing Transformers and a full KV cache.

    python tools/memory_footprint.py configs/llama-1b-infini.yaml
    python tools/memory_footprint.py --paper          # the paper's LM: 12 layers, 8 heads x 128, N=2048

Formulas (Infini-attention paper, Table 1), l layers, H key/value heads, d_k = d_v head dims,
N segment length:
    Infini-Transformer        d_k * (d_v + 1) * H * l                    (M and z; constant)
    Transformer-XL            (d_k + d_v) * H * N * l                    (KV cache of the last segment)
    Memorizing Transformers   (d_k + d_v) * H * (N * l + T_knn)          (XL cache in every layer + a kNN
                              memory of T_knn tokens in one layer; Table 1's (d_k + d_v) H N S term
                              with N S = T_knn. With T_knn = 65536 the paper's LM gives 184.5M, the
                              paper reports 183M)
    Full attention KV cache   2 * d_k * H * l * T                         (grows with the input length T)
For a config with model.memory_type compressive / xl, the memory of that config is printed too:
    (n_m + n_cm) * H * (d_k + d_v + 1) per layer (keys, values and a valid flag per slot).
With grouped-query attention the memory and the caches are kept per key/value head (H = query
groups). Numbers are counts of values; bytes use fp32 for the Infini memory (it is kept in fp32,
docs/infini.md) and --cache-bytes (default 2, bf16) for the caches.
"""

from __future__ import annotations

import argparse
import sys


def human(n: float, unit: str = "") -> str:
    for suffix, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def tokens_label(t: int) -> str:
    for suffix, div in (("M", 2**20), ("K", 2**10)):
        if t >= div and t % div == 0:
            return f"{t // div}{suffix}"
    return str(t)


def human_bytes(n: float) -> str:
    for suffix, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def footprint(layers: int, kv_heads: int, d_k: int, d_v: int, N: int, knn_tokens: int) -> dict:
    infini_layer = kv_heads * d_k * (d_v + 1)
    return {
        "infini_per_layer": infini_layer,
        "infini": infini_layer * layers,
        "transformer_xl": (d_k + d_v) * kv_heads * N * layers,
        "memorizing_transformers": (d_k + d_v) * kv_heads * (N * layers + knn_tokens),
        "kv_cache_per_token": 2 * d_k * kv_heads * layers,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="training config YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--paper", action="store_true", help="the paper's LM instead of a config")
    p.add_argument("--knn-tokens", type=int, default=65536, help="kNN memory of Memorizing Transformers")
    p.add_argument("--cache-bytes", type=int, default=2, help="bytes per cached key/value (2: bf16)")
    p.add_argument("--lengths", default="32768,1048576,10485760", help="input lengths for the full KV cache")
    args = p.parse_args(argv)
    if args.paper:
        name, layers, heads, kv_heads, d, N = "paper LM (12 layers, 8 heads x 128, N=2048)", 12, 8, 8, 128, 2048
    elif args.config:
        from megatron_infini.training.config import ConfigError, load_config

        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            print(f"memory_footprint: {e}", file=sys.stderr)
            return 2
        m = cfg.model
        layers, heads, N = m.num_layers, m.num_attention_heads, m.segment_length
        kv_heads, d = m.num_query_groups or heads, m.hidden_size // heads
        name = f"{args.config} ({layers} layers, {heads} query / {kv_heads} key-value heads x {d}, N={N})"
        tp = cfg.parallel.tensor_model_parallel_size
    else:
        p.error("give a config or --paper")
    f = footprint(layers, kv_heads, d, d, N, args.knn_tokens)
    extra = ""
    if args.config and m.memory_type != "infini":
        # compressive / xl layers keep keys and values of n_m tokens and n_cm compressed slots per
        # key/value head, plus one valid flag per slot (megatron_infini.layers.compressive)
        n_m = m.xl_memory_length or N
        n_cm = (m.compressed_memory_length or n_m) if m.memory_type == "compressive" else 0
        per_layer = kv_heads * (n_m + n_cm) * (2 * d + 1)
        extra = (f"  Memory of this config: memory_type={m.memory_type}, n_m={n_m}, n_cm={n_cm}: {per_layer:,d} values "
              f"per layer and sample ({human_bytes(per_layer * args.cache_bytes)} at {args.cache_bytes} bytes/value), "
              f"{per_layer // tp:,d} per tensor-parallel rank (TP={tp}, split by head); "
              f"{per_layer / f['infini_per_layer']:.1f}x the Infini memory")
    ib, cb = 4, args.cache_bytes
    print(f"Memory footprint: {name}")
    print(f"  Infini memory per layer : {f['infini_per_layer']:>14,d} values  ({human_bytes(f['infini_per_layer'] * ib)} fp32)"
          f"   = H * d_k * (d_v + 1) = {kv_heads} * {d} * {d + 1}")
    rows = [("Infini-Transformer", f["infini"], ib),
            ("Transformer-XL", f["transformer_xl"], cb),
            (f"Memorizing Transformers (kNN {tokens_label(args.knn_tokens)} tokens)", f["memorizing_transformers"], cb)]
    print(f"  {'model':<46} {'values':>14} {'bytes':>12} {'vs Infini':>10}")
    for label, n, b in rows:
        print(f"  {label:<46} {n:>14,d} {human_bytes(n * b):>12} {n / f['infini']:>9.1f}x")
    print(f"  Full-attention KV cache ({cb} bytes/value): {f['kv_cache_per_token']:,d} values per token")
    for t in (int(x) for x in args.lengths.split(",") if x):
        n = f["kv_cache_per_token"] * t
        print(f"    at {tokens_label(t):>5} tokens: {n:>18,d} values {human_bytes(n * cb):>12}  "
              f"({n / f['infini']:,.0f}x the Infini memory)")
    if extra:
        print(extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
