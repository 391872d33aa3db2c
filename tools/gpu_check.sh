#!/usr/bin/env bash
# GPU validation of megatron-infini in one run (at most ~8 minutes on one H100/H200), ending in
# one summary table: the gpu-marked tests; the op in bf16 against flash full causal attention at
# 8K/32K/128K; the 1B preset training 10 steps at 4K and 32K tokens (tokens/s, MFU, peak memory
# against launch/memory.py's estimate); save + resume; streaming prefill of 1M tokens.
# What does not fit (memory estimate, time left) is skipped with the reason in the table.
#
#   bash tools/gpu_check.sh                       # all stages, logs in a new temporary directory
#   bash tools/gpu_check.sh --out runs/gpu_check --only op,train --budget-s 300
#   bash tools/gpu_check.sh --dry-run             # print the plan only
#
# Python: $PYTHON, else ./.venv/bin/python, else python3 (a CUDA build of torch is needed).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then exec "$PY" tools/gpu_check.py "$@"; fi
done
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False with $PY): nothing to check"
    exit 0
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$PY" tools/gpu_check.py "$@"
