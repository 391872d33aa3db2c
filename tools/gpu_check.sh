#!/usr/bin/env bash
# GPU validation of megatron-infini in one device command (540 s in all, install included), ending in
# one summary table; gpu_check.json and gpu_check.md are rewritten after every stage (in --out and
# in $OUT when set). Stages in value order, each under its cap: op (Infini vs local only vs flash,
# SDPA kernel), drift (bf16 vs float64), tests (pytest -m gpu), train (1B, Infini vs local only),
# compile (Inductor vs eager), multigpu (TP=2+SP, CP=2, ZeRO-1 DP=2; needs 2 GPUs), stream (1M tokens).
#
#   bash tools/gpu_check.sh                       # all default stages
#   bash tools/gpu_check.sh --out runs/gpu_check --only op,drift,train
#   bash tools/gpu_check.sh --dry-run             # the stages, their caps and the total (no GPU needed)
#
# Python: $PYTHON, else ./.venv/bin/python, else python3 (a CUDA build of torch is needed). When
# megatron-core or DeepSpeed do not import and ./.whl holds wheels (tools/gpu_wheels.sh, for machines
# without a package index), they are installed into /tmp/gpu_check_site first.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
TOTAL_S=${GPU_CHECK_TOTAL_S:-540}
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
budget_given=0
for arg in "$@"; do
    case "$arg" in
        --dry-run|--cpu-smoke) exec "$PY" tools/gpu_check.py "$@" ;;
        --budget-s|--budget-s=*) budget_given=1 ;;
    esac
done
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False with $PY): nothing to check"
    exit 0
fi
if ! "$PY" -c "import megatron.core, deepspeed" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    echo "[gpu_check] installing the carried wheels (.whl) into /tmp/gpu_check_site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl || echo "[gpu_check] wheel install failed"
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$budget_given" = 0 ]; then
    set -- --budget-s $((TOTAL_S - (SECONDS - START) - 10)) "$@"  # 10 s for start-up and the report
fi
exec "$PY" tools/gpu_check.py "$@"
