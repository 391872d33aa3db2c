#!/usr/bin/env bash
# Install what the tests need (from scratch on a fresh machine) and run the whole suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k ops -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=$(bash tools/setup_env.sh)
export WANDB_MODE=${WANDB_MODE:-disabled}
exec "$PYTHON" -m pytest -q -rs --durations=15 "$@"
