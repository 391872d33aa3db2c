#!/usr/bin/env bash
# Fill ./.whl with the wheels tools/gpu_check.sh installs on a GPU machine that has CUDA torch but no
# package index (megatron-core, DeepSpeed and what they need beyond such an image's packages), for
# its Python (default 3.12) on x86-64 Linux. Run it here, where pip reaches the index; .whl is
# git-ignored, so name it in what travels to the GPU machine.
#
#   bash tools/gpu_wheels.sh            # PY_VERSION=3.11 bash tools/gpu_wheels.sh for another Python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
VER=${PY_VERSION:-3.12}
mkdir -p .whl
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    PLAT+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$VER" --implementation cp "${PLAT[@]}" -d .whl \
    "megatron-core==0.16.1" "pydantic-core==2.50.5" "pydantic==2.14.4" "annotated-types==0.8.0" \
    "typing-inspection==0.4.5" "typing-extensions>=4.16" "hjson==3.1.0"
# DeepSpeed is published as source only: build its pure-Python wheel (no CUDA ops: DS_BUILD_OPS=0)
# against the torch installed here.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8"
ls -l .whl
