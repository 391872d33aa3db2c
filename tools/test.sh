#!/usr/bin/env bash
# Install what the tests need (from scratch on a fresh machine: the venv and, where apt-get is
# available, Debian's slurm-wlm for the launcher tests) and run the whole suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k ops -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_slurm.sh
PYTHON=$(bash tools/setup_env.sh)
export WANDB_MODE=${WANDB_MODE:-disabled}
# DeepSpeed JIT-builds a small CPU op once; keep the build cache with this venv
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
exec "$PYTHON" -m pytest -q -rs --durations=20 "$@"
