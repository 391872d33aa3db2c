#!/usr/bin/env bash
# Install what the tests need (from scratch on a fresh machine: the venvs and, where apt-get is
# available, Debian's slurm-wlm for the launcher tests) and run the whole suite on both ends of
# the supported versions (docs/versions.md), one venv each:
#   3.12  Python 3.12, the newest megatron-core pip resolves (0.19.x)   .venv312
#   3.11  Python 3.11, megatron-core 0.16.1                              .venv311
# Extra arguments go to pytest on every leg, e.g. `bash tools/test.sh -k ops -x`.
# MEGATRON_INFINI_TEST_PYTHONS picks legs (default "3.12 3.11"; e.g. =3.11 runs one).
# Exit status 0 only when every leg passed; a leg where pytest ran no test counts as failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install_slurm.sh
export WANDB_MODE=${WANDB_MODE:-disabled}

declare -A MEGATRON_CORE=([3.12]="" [3.11]="megatron-core==0.16.1")
failed=()
for py in ${MEGATRON_INFINI_TEST_PYTHONS:-3.12 3.11}; do
    if [ -z "${MEGATRON_CORE[$py]+set}" ]; then
        echo "[test] unknown leg '$py' in MEGATRON_INFINI_TEST_PYTHONS (known: ${!MEGATRON_CORE[*]})" >&2
        exit 2
    fi
    venv=.venv${py/./}
    python=$(VENV=$venv PYTHON_VERSION=$py MEGATRON_CORE=${MEGATRON_CORE[$py]} bash tools/setup_env.sh)
    echo "[test] leg $py: $("$python" -c 'import sys, torch
from importlib.metadata import version
print("Python %d.%d.%d" % sys.version_info[:3], "torch", torch.__version__, "megatron-core", version("megatron-core"))')"
    rc=0
    # DeepSpeed JIT-builds a small CPU op once; keep the build cache with the leg's venv
    TORCH_EXTENSIONS_DIR=$PWD/$venv/torch_extensions "$python" -m pytest -q -rs --durations=20 "$@" || rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "[test] leg $py: pytest collected no test (exit 5): counted as a failure" >&2
    fi
    if [ "$rc" -ne 0 ]; then
        failed+=("$py (exit $rc)")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "[test] FAILED legs: ${failed[*]}" >&2
    exit 1
fi
echo "[test] all legs passed"
