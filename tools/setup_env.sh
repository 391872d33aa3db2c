#!/usr/bin/env bash
# Create (or reuse) ./.venv with everything megatron-infini needs, then print its python.
# On a machine without CUDA this installs the CPU build of torch (the unpinned `torch`
# would pull a multi-GB CUDA build). Safe to run repeatedly: a no-op when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "[setup] installing torch (CUDA build)" >&2
        "${PIP[@]}" install torch
    else
        echo "[setup] installing torch==2.13.0 (CPU build)" >&2
        "${PIP[@]}" install torch==2.13.0
    fi
fi
stamp="$VENV/.megatron_infini_installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[setup] installing megatron-infini and its dependencies" >&2
    "${PIP[@]}" install -e ".[test]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    "$VENV/bin/python" -c "import megatron_infini, megatron.core, deepspeed, sentencepiece" >&2 2>/dev/null \
        || { echo "[setup] install failed" >&2; exit 1; }
    touch "$stamp"
fi
echo "$VENV/bin/python"
