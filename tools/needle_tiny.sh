#!/usr/bin/env bash
# Tiny natural-text needle retriever: makes training documents in the format of
# `megatron-infini eval needle` from the shipped training plays (never the held-out play the
# evaluation reads): K named needles per document at random depths and offsets, numbers of the
# keys' form sprinkled in the text; trains configs/needle_tiny.yaml on them with the real
# trainer and records the prompt format in RUN_DIR/needle_recipe.json.
#
#   bash tools/needle_tiny.sh runs/needle_tiny [SEED] [section.key=value ...]
#   megatron-infini eval needle --checkpoint runs/needle_tiny --lengths T+5,16T+5,64T+5 --needles 2 \
#       --haystack-numbers 3 --no-memory
#
# SEED (default 0) sets the data, the data order and the initialisation. Environment: STEPS
# (default: the config's), K (needles per document, default 2), T (training length, default
# 128), DIGITS (key digits, default 2), NUMBERS (haystack numbers per 100 tokens, default 3),
# MIN_LENGTH (shortest document, default 80), ANSWER_WEIGHT (loss weight of the answer, default
# 20), TEXT_WEIGHT (of the prompt, default 0: the haystack is natural text whose language-model
# loss would dominate the weighted loss of a model trained from scratch), NEEDLE_WEIGHT (of the
# needles' tokens in the prompt, default TEXT_WEIGHT), FILLER_SHARE (share of documents on the
# passkey filler instead of the plays, default 0), OMP_NUM_THREADS
# (default 2). Extra arguments are trainer config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:?usage: bash tools/needle_tiny.sh RUN_DIR [SEED] [overrides]}
shift
SEED=0
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then SEED=$1; shift; fi
PYTHON=${PYTHON:-$(bash tools/setup_env.sh)}
K=${K:-2} T=${T:-128} DIGITS=${DIGITS:-2} NUMBERS=${NUMBERS:-3} MIN_LENGTH=${MIN_LENGTH:-80}
ANSWER_WEIGHT=${ANSWER_WEIGHT:-20} TEXT_WEIGHT=${TEXT_WEIGHT:-0} NEEDLE_WEIGHT=${NEEDLE_WEIGHT:-$TEXT_WEIGHT} FILLER_SHARE=${FILLER_SHARE:-0}
STEPS=${STEPS:-$("$PYTHON" -c "import yaml; print(yaml.safe_load(open('configs/needle_tiny.yaml'))['train']['steps'])")}
export WANDB_MODE=${WANDB_MODE:-disabled} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=ignore
mkdir -p "$RUN_DIR"

echo "== needle_tiny: data (T=$T, $K needles, documents of $MIN_LENGTH..$T tokens, $DIGITS-digit keys, $NUMBERS numbers per 100 tokens)"
"$PYTHON" -m megatron_infini.cli eval needle-data --out "$RUN_DIR/data" --length "$T" --min-length "$MIN_LENGTH" \
    --samples $((STEPS * 16)) --needles "$K" --key-digits "$DIGITS" --haystack-numbers "$NUMBERS" \
    --answer-weight "$ANSWER_WEIGHT" --text-weight "$TEXT_WEIGHT" --needle-weight "$NEEDLE_WEIGHT" \
    --filler-share "$FILLER_SHARE" --seed "$SEED"

echo "== needle_tiny: train $STEPS steps (seed $SEED)"
"$PYTHON" -m megatron_infini.train --config configs/needle_tiny.yaml "run_dir=$RUN_DIR" \
    "data.train_data=$RUN_DIR/data/needle_train" "data.train_loss_weights=$RUN_DIR/data/needle_train_weights" \
    "train.seq_length=$T" "train.steps=$STEPS" "train.seed=$SEED" "data.seed=$SEED" "$@" > "$RUN_DIR/train.log" 2>&1 \
    || { tail -20 "$RUN_DIR/train.log"; exit 1; }
grep -E "^step" "$RUN_DIR/train.log" | tail -2 || true

"$PYTHON" - "$RUN_DIR" "$T" "$K" "$DIGITS" <<'PY'
import sys
from megatron_infini.evaluation.recipe import write_recipe
run_dir, t, k, digits = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print("wrote", write_recipe(run_dir, t, digits, intro=False, needles=k, file="needle_recipe.json"))
PY
