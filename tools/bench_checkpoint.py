"""Checkpoint save and load throughput on CPU: one process, a Llama-style model of ~1 GB (fp32).

    python tools/bench_checkpoint.py [--hidden 1024 --layers 16 --vocab 32000] [--dir /tmp/ckbench]

Builds the model with our trainer's code (DeepSpeed ZeRO-1, AdamW), gives the optimizer its
state, then times `CheckpointManager.save` (weights + Adam moments, fully parallel save,
manifest with checksums, atomic rename) and `CheckpointManager.load` (manifest verification,
weights, optimizer state), and prints one JSON line: bytes written, seconds and GB/s of each,
the time to hash the checkpoint once (the manifest: once in a save, once in a load's
verification) and the rates without it. GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dir", default="/tmp/megatron_infini_ckbench")
    args = p.parse_args(argv)

    from megatron_infini.checkpointing import CheckpointManager, manifest
    from megatron_infini.checkpointing import optimizer_state as ost
    from megatron_infini.training.config import Config
    from megatron_infini.training.distributed import destroy_distributed, init_distributed
    from megatron_infini.training.engine import build_engine
    from megatron_infini.training.model import build_model

    cfg = Config()
    cfg.model.hidden_size, cfg.model.num_layers = args.hidden, args.layers
    cfg.model.num_attention_heads, cfg.model.num_query_groups = args.hidden // 64, args.hidden // 64
    cfg.train.seq_length, cfg.model.segment_length = 256, 64
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 1, 1
    cfg.deepspeed.zero_stage = 1
    shutil.rmtree(args.dir, ignore_errors=True)
    init_distributed(cfg.validate())
    try:
        model = build_model(cfg, args.vocab)
        engine, _ = build_engine(model, cfg, 1)
        ost._materialize(engine, ost.kind(engine))  # Adam state as after a first step
        n_params = sum(p.numel() for p in model.parameters())
        mgr = CheckpointManager(args.dir, engine, model, keep_last=0, tp_size=1)

        t0 = time.perf_counter()
        path = mgr.save(1, {"step": 1, "consumed_tokens": 0, "data": {"consumed_samples": 0}}, {})
        save_s = time.perf_counter() - t0
        size = _dir_bytes(path)
        t0 = time.perf_counter()
        manifest.verify(path)
        hash_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        mgr.load(path, allow_fresh_optimizer=False)
        load_s = time.perf_counter() - t0
        out = {"params": n_params, "weights_gb": round(n_params * 4 / 1e9, 3), "checkpoint_gb": round(size / 1e9, 3),
               "save_s": round(save_s, 2), "save_gb_per_s": round(size / 1e9 / save_s, 3),
               "load_s": round(load_s, 2), "load_gb_per_s": round(size / 1e9 / load_s, 3),
               "checksum_s": round(hash_s, 2),
               # the manifest hashes every file once in a save and once in a load's verification
               "save_gb_per_s_without_checksums": round(size / 1e9 / max(save_s - hash_s, 1e-9), 3),
               "load_gb_per_s_without_checksums": round(size / 1e9 / max(load_s - hash_s, 1e-9), 3),
               "torch_threads": torch.get_num_threads()}
        print(json.dumps(out), flush=True)
    finally:
        destroy_distributed()
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
