#!/bin/bash
# The benchmark on an accelerator, in one call: ML-1M's PKA and SASRec shapes in bfloat16 and
# float32, batch 1,024 for scaling, the fused-attention check, and a profiler trace of the
# bfloat16 PKA step. Figures go to OUT (default /tmp/pka_jax_accelerator) as JSON and text.
#
#   OUT=/tmp/acc bash experiments/accelerator_benchmark.sh   # PYTHON=..., LIMIT=seconds per run
#
# Each run has its own time limit (LIMIT, 100 s by default: under 10 minutes in all), so a slow
# one cannot use up a lent machine's budget.
set -u
OUT=${OUT:-/tmp/pka_jax_accelerator}
LIMIT=${LIMIT:-100}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { grep -v -E '^[IW][0-9]{4} ' | tee -a "$OUT/log.txt"; }
ML1M="--config.data_dir=$OUT/data --synthetic_items=3416 --synthetic_users=6040"

for run in pka:bfloat16:256 pka:float32:256 sasrec:bfloat16:256 sasrec:float32:256 \
           pka:bfloat16:1024; do
  IFS=: read -r model dtype batch <<< "$run"
  echo "=== $model $dtype batch $batch" | tee -a "$OUT/log.txt"
  extra=""
  if [ "$run" = pka:bfloat16:256 ]; then extra="--epochs=2 --profile_dir=$OUT/trace"; fi
  timeout "$LIMIT" "$PYTHON" experiments/benchmark.py --config="configs/ml1m.py:model=$model" \
    $ML1M --config.dtype="$dtype" --config.batch_size="$batch" --steps=20 $extra \
    --json="$OUT/${model}_${dtype}_${batch}.json" 2>&1 | log
done
echo "=== attention check" | tee -a "$OUT/log.txt"
timeout "$LIMIT" "$PYTHON" experiments/attention_check.py --config=configs/ml1m.py \
  --config.data_dir="$OUT/data" --synthetic_items=3416 --config.dtype=bfloat16 2>&1 | log
