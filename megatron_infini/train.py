"""Training entry point.

    torchrun --nproc-per-node N -m megatron_infini.train --config CONFIG.yaml [section.key=value ...]
    megatron-infini train --config CONFIG.yaml [section.key=value ...]

Exit codes: 0 done; 75 stopped on request after a checkpoint (requeue); 2 bad config or data
(reported before any work); 1 any other failure.
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
    from megatron_infini.training import exit_codes
    from megatron_infini.training.config import ConfigError, load_config

    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"megatron-infini train: config error: {e}", file=sys.stderr)
        return exit_codes.EXIT_CONFIG_ERROR

    from megatron_infini.training.distributed import destroy_distributed, init_distributed
    from megatron_infini.training.loop import Trainer

    try:
        init_distributed(cfg)
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


if __name__ == "__main__":
    sys.exit(main())
