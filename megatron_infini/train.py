"""Training entry point.

    torchrun --nproc-per-node N -m megatron_infini.train --config CONFIG.yaml [section.key=value ...]
    megatron-infini train --config CONFIG.yaml [section.key=value ...]

Exit codes: 0 done; 75 stopped on request after a checkpoint, or signalled before the first
step (requeue); 2 bad config or data (reported before any work); 3 too many non-finite steps in
a row; 4 hang (no step within train.hang_timeout_s); 1 any other failure (docs/faults.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def parse_args(argv):
    p = argparse.ArgumentParser(prog="megatron-infini train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: the built-in debug defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megatron_infini.training import early_stop

    early_stop.install()  # first: a preemption while importing or loading exits 75 at once
    from megatron_infini.training import exit_codes
    from megatron_infini.training.config import ConfigError, load_config

    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"megatron-infini train: config error: {e}", file=sys.stderr)
        return exit_codes.EXIT_CONFIG_ERROR
    early_stop.set_phase("importing", run_dir=cfg.run_dir)

    from megatron_infini.training.distributed import destroy_distributed, init_distributed
    from megatron_infini.training.loop import Trainer

    try:
        early_stop.set_phase("initialising process groups")
        init_distributed(cfg)
        early_stop.set_phase("building the model")
        _log_versions(cfg, rank)
        return Trainer(cfg).train()
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # bad data, tokenizer or layout: one clear line, no traceback soup
        print(f"megatron-infini train [rank {rank}]: error: {e}", file=sys.stderr, flush=True)
        return exit_codes.EXIT_CONFIG_ERROR
    except Exception:
        print(f"megatron-infini train [rank {rank}]: failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return exit_codes.EXIT_FAILURE
    finally:
        destroy_distributed()


def _log_versions(cfg, rank: int) -> None:
    if rank != 0:
        return
    import deepspeed
    import megatron.core
    import torch

    import megatron_infini

    print(f"[train] megatron-infini {megatron_infini.__version__}, torch {torch.__version__}, "
          f"megatron-core {megatron.core.__version__}, deepspeed {deepspeed.__version__}; "
          f"run_dir {os.path.abspath(cfg.run_dir)}", file=sys.stderr, flush=True)
    from megatron_infini.log import enable_package_log
    from megatron_infini.spec import choose_transformer_impl
    from megatron_infini.training.engine import grad_accum_dtype, optimizer_impl, use_bf16

    enable_package_log()  # the attention kernel choice and other one-time notes
    bf16 = use_bf16(cfg)
    print(f"[train] precision {'bf16' if bf16 else 'fp32'} (gradient accumulation {grad_accum_dtype(cfg, bf16)}, "
          f"reduction {cfg.deepspeed.communication_data_type if bf16 else 'fp32'}, fp32 master weights and memory), "
          f"optimizer {optimizer_impl(cfg)}, layers {choose_transformer_impl(cfg.model.transformer_impl)}"
          f"{', fp8 ' + cfg.model.fp8 if cfg.model.fp8 else ''}{', compiled' if cfg.train.compile else ''}",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
