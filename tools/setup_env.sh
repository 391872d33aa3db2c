#!/usr/bin/env bash
# Create (or reuse) a venv with everything megatron-infini needs, then print its python.
# On a machine without CUDA this installs torch==2.13.0 first (on Python 3.11 the CPU build;
# an unpinned `torch` would pull a multi-GB CUDA build). Safe to run repeatedly: a no-op when
# up to date.
#
# Environment (all optional):
#   VENV            the venv directory (default .venv)
#   PYTHON          the interpreter that creates it (default python3)
#   PYTHON_VERSION  e.g. 3.12: find that Python (on PATH, else under pyenv) instead of PYTHON
#   MEGATRON_CORE   a pip requirement pinning megatron-core, e.g. "megatron-core==0.16.1"
#                   (default: pip's own resolution of pyproject.toml's range)
# tools/test.sh uses these for its two legs (docs/versions.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# The interpreter of version $1 (e.g. 3.12), or nothing. A bare `python3.12` may be a pyenv shim
# that answers "command not found" for a version that is not selected, so each candidate is run.
find_python() {
    local want=$1 cand root
    local cands=("python$want")
    if command -v pyenv >/dev/null 2>&1 && root=$(pyenv root 2>/dev/null); then
        cands+=($(ls -d "$root"/versions/"$want".*/bin/python"$want" 2>/dev/null | sort -V -r))
    fi
    cands+=("$HOME/.pyenv/versions/$want"*/bin/python"$want" "/usr/bin/python$want" "/usr/local/bin/python$want")
    for cand in "${cands[@]}"; do
        if "$cand" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$want'.split('.')))" \
            >/dev/null 2>&1; then
            echo "$cand"
            return 0
        fi
    done
    return 1
}

if [ -n "${PYTHON_VERSION:-}" ]; then
    PY=$(find_python "$PYTHON_VERSION") || {
        echo "[setup] Python $PYTHON_VERSION not found (tried python$PYTHON_VERSION on PATH and" \
             "pyenv's versions/$PYTHON_VERSION.*); install it (e.g. 'pyenv install $PYTHON_VERSION')" >&2
        exit 1
    }
else
    PY=${PYTHON:-python3}
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $("$PY" --version 2>&1) ($PY)" >&2
    "$PY" -m venv "$VENV"
fi
if [ -n "${PYTHON_VERSION:-}" ]; then
    have=$("$VENV/bin/python" -c "import sys; print('%d.%d' % sys.version_info[:2])")
    if [ "$have" != "$PYTHON_VERSION" ]; then
        echo "[setup] $VENV has Python $have, not $PYTHON_VERSION: remove it to recreate it" >&2
        exit 1
    fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "[setup] installing torch (CUDA build)" >&2
        "${PIP[@]}" install torch
    else
        echo "[setup] installing torch==2.13.0 (the CPU build where one exists for this Python)" >&2
        "${PIP[@]}" install torch==2.13.0
    fi
fi
stamp="$VENV/.megatron_infini_installed"
want="${MEGATRON_CORE:-}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing megatron-infini and its dependencies${want:+ ($want)}" >&2
    # shellcheck disable=SC2086
    "${PIP[@]}" install -e ".[test]" $want 2>&1 | grep -v "^WARNING: Location" >&2 || true
    "$VENV/bin/python" -c "import megatron_infini, megatron.core, deepspeed, sentencepiece" >&2 2>/dev/null \
        || { echo "[setup] install failed" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
echo "$VENV/bin/python"
