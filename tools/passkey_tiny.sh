#!/usr/bin/env bash
# Tiny passkey retriever: makes passkey training documents in the format of
# `megatron-infini eval passkey` and trains configs/passkey_tiny.yaml on them with the real
# trainer, then records the prompt format in RUN_DIR/passkey_recipe.json.
#
#   bash tools/passkey_tiny.sh runs/passkey_tiny [section.key=value ...]
#   megatron-infini eval passkey --checkpoint runs/passkey_tiny --lengths T,4T,16T,64T --no-memory
#
# Environment: SEED (training and data seed, default 0), STEPS (default: the config's),
# NPROC (trainer processes, default 1; OMP_NUM_THREADS default 2), T (training length, default 128), DIGITS (key digits,
# default 2), MIN_LENGTH (shortest training prompt, default 48), ANSWER_WEIGHT (loss weight of
# the answer tokens, default 20). Extra arguments are trainer config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:?usage: bash tools/passkey_tiny.sh RUN_DIR [overrides]}
shift
PYTHON=${PYTHON:-$(bash tools/setup_env.sh)}
SEED=${SEED:-0} NPROC=${NPROC:-1} T=${T:-128} DIGITS=${DIGITS:-2} MIN_LENGTH=${MIN_LENGTH:-48}
ANSWER_WEIGHT=${ANSWER_WEIGHT:-20}
STEPS=${STEPS:-$("$PYTHON" -c "import yaml; print(yaml.safe_load(open('configs/passkey_tiny.yaml'))['train']['steps'])")}
# two threads: ~0.13 s a step on 2 cores (one: ~0.23 s), the same losses
export WANDB_MODE=${WANDB_MODE:-disabled} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=ignore
mkdir -p "$RUN_DIR"

echo "== passkey_tiny: data (T=$T, prompts of $MIN_LENGTH..$T tokens, $DIGITS-digit keys, answer weight $ANSWER_WEIGHT)"
"$PYTHON" -m megatron_infini.cli eval passkey-data --out "$RUN_DIR/data" --length "$T" --min-length "$MIN_LENGTH" \
    --samples $((STEPS * 16)) --key-digits "$DIGITS" --no-intro --answer-weight "$ANSWER_WEIGHT" --seed "$SEED"

echo "== passkey_tiny: train $STEPS steps ($NPROC process(es))"
if [ "$NPROC" -gt 1 ]; then
    LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_infini.train)
else
    LAUNCH=("$PYTHON" -m megatron_infini.train)
fi
"${LAUNCH[@]}" --config configs/passkey_tiny.yaml "run_dir=$RUN_DIR" "data.train_data=$RUN_DIR/data/passkey_train" \
    "data.train_loss_weights=$RUN_DIR/data/passkey_train_weights" "train.seq_length=$T" "train.steps=$STEPS" \
    "train.seed=$SEED" "data.seed=$SEED" "train.micro_batch_size=$((16 / NPROC))" "$@" > "$RUN_DIR/train.log" 2>&1 \
    || { tail -20 "$RUN_DIR/train.log"; exit 1; }
grep -E "^step" "$RUN_DIR/train.log" | tail -2 || true

"$PYTHON" - "$RUN_DIR" "$T" "$DIGITS" <<'PY'
import sys
from megatron_infini.evaluation.recipe import write_recipe
print("wrote", write_recipe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), intro=False))
PY
