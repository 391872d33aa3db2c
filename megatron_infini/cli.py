"""`megatron-infini` console script: dispatches to the subcommands' own entry points.

Each subcommand lives in its own module and is imported only when called, so
`megatron-infini --help` stays fast and nothing heavy runs at import time.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with a `main(argv)` function, one-line help)
SUBCOMMANDS = {
    "train": ("megatron_infini.train", "train (run under torchrun for several ranks)"),
    "launch": ("launch.cli", "submit a Slurm job or run torchrun locally"),
    "train-tokenizer": ("megatron_infini.data.train_tokenizer", "train a tokenizer (sentencepiece or Hugging Face)"),
    "preprocess": ("megatron_infini.data.preprocess", "tokenize text/JSONL into indexed shards"),
    "generate": ("megatron_infini.inference.generate", "stream a prompt of any length, then generate"),
    "eval": ("megatron_infini.evaluation.cli", "evaluate a checkpoint: passkey | passkey-data | perplexity"),
}


def _usage() -> str:
    lines = ["usage: megatron-infini <command> [args]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"megatron-infini: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
