#!/usr/bin/env bash
# Install Debian's slurm-wlm (slurmctld, slurmd, sbatch, ...) when it is missing.
# Idempotent: does nothing when the binaries are already on PATH. The Slurm tests
# (tests/test_slurm.py) start a throw-away one-node cluster with these binaries.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install_slurm.sh: slurm is missing and apt-get is not available; the Slurm tests will be skipped" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo -n"; else
        echo "install_slurm.sh: not root and no sudo; cannot install slurm-wlm" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends slurm-wlm >/dev/null
echo "install_slurm.sh: installed slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm)" >&2
