"""`megatron-infini eval <task> ...`: dispatch to the evaluation modules (imported on use)."""

from __future__ import annotations

import importlib
import sys

TASKS = {
    "passkey": ("megatron_infini.evaluation.passkey", "main", "passkey retrieval accuracy, length x depth"),
    "passkey-data": ("megatron_infini.evaluation.finetune_data", "main", "passkey fine-tuning data (JSONL + shards)"),
    "needle": ("megatron_infini.evaluation.needle", "main", "needle in a haystack: natural text, distractor keys"),
    "needle-data": ("megatron_infini.evaluation.needle_data", "main", "needle training documents (natural text, K keys)"),
    "perplexity": ("megatron_infini.evaluation.perplexity", "main", "perplexity per segment position, memory on/off"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in TASKS:
        lines = ["usage: megatron-infini eval <task> [args]", "", "tasks:"]
        lines += [f"  {k:<14} {h}" for k, (_, _, h) in TASKS.items()]
        print("\n".join(lines), file=sys.stdout if not argv or argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, fn, _ = TASKS[argv[0]]
    return getattr(importlib.import_module(module), fn)(argv[1:]) or 0
