#!/bin/bash
# The benchmarks on an accelerator, in one call: ML-1M's PKA shape in bfloat16 (speed/
# benchmark.py, with two real epochs and a profiler trace), then kernels/benchmark.py's loss
# alone (XLA against the Pallas kernels in several tilings, which it also checks against XLA's
# loss), attention, LayerNorm and the encoder with the blocks' second halves fused (XLA
# against the Pallas kernels, checked the same way), the step with every Pallas kernel
# (traced), with the Pallas loss, attention and both, the fused-attention check
# (kernels/attention_check.py), then PKA in float32, SASRec in both, and batch 1,024 for
# scaling.
# Figures go to OUT (default /tmp/pka_jax_accelerator) as JSON and text, each trace (with the
# traced step's HLO) as a .tgz and its breakdown by part of the model
# (experiments.speed.trace_breakdown, the longest chain's time included) in the log; the
# synthetic data and scratch files stay outside OUT. Run it from the repository root: it runs
# the experiments as modules (python -m experiments.<group>.<name>).
#
#   OUT=/tmp/acc bash experiments/accelerator_benchmark.sh   # PYTHON=..., LIMIT=, TOTAL=
#
# On a machine without grain or ml_collections and no package registry, fetch their wheels
# first: experiments/accelerator_wheels.sh, whose header has the command.
#
# Each run has its own time limit (LIMIT, 75 s by default), so a slow or broken one cannot use
# up a rented machine's hour, and no run starts that could end after TOTAL seconds (540 by
# default); the most wanted figures come first.
set -u
OUT=${OUT:-/tmp/pka_jax_accelerator}
LIMIT=${LIMIT:-75}
TOTAL=${TOTAL:-540}
PYTHON=${PYTHON:-python3}
SCRATCH=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { grep -v -E '^[IW][0-9]{4} ' | tee -a "$OUT/log.txt"; }
ML1M="--config.data_dir=$SCRATCH/data --synthetic_items=3416 --synthetic_users=6040"

nvidia-smi -L 2>&1 | log
"$PYTHON" -c "import jax, flax, optax, orbax.checkpoint as o, grain, chex
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'orbax', o.__version__, 'chex', chex.__version__, jax.devices())" 2>&1 | log

room() {  # what: whether a run may start and still end within TOTAL
  [ $((SECONDS + LIMIT)) -le "$TOTAL" ] && return
  echo "=== $1 skipped: ${SECONDS}s of ${TOTAL}s used" | tee -a "$OUT/log.txt"
  return 1
}
bench() {  # model dtype batch [extra flags]
  local model=$1 dtype=$2 batch=$3; shift 3
  room "$model $dtype batch $batch${TAG:-}" || return
  echo "=== $model $dtype batch $batch${TAG:-}" | tee -a "$OUT/log.txt"
  timeout "$LIMIT" "$PYTHON" -m experiments.speed.benchmark \
    --config="configs/ml1m.py:model=$model" $ML1M --config.dtype="$dtype" \
    --config.batch_size="$batch" --steps=20 "$@" \
    --json="$OUT/${model}_${dtype}_${batch}${TAG:-}.json" 2>&1 | log
}
kernel_bench() {  # kernel dtype what: one part of the step against its Pallas kernels
  room "$3, $2" || return
  echo "=== $3, $2" | tee -a "$OUT/log.txt"
  timeout "$LIMIT" "$PYTHON" -m experiments.kernels.benchmark --kernel="$1" --dtype="$2" \
    --json="$OUT/$1_$2.json" 2>&1 | log
}

breakdown() {  # trace what: the breakdown of the trace SCRATCH/trace, kept as OUT/trace.tgz
  [ -d "$SCRATCH/$1" ] || return
  echo "=== where the step's time goes, $2" | tee -a "$OUT/log.txt"
  "$PYTHON" -m experiments.speed.trace_breakdown "$SCRATCH/$1" --top=25 2>&1 | log
  tar -czf "$OUT/$1.tgz" -C "$SCRATCH" "$1" 2>/dev/null
}

bench pka bfloat16 256 --epochs=2 --profile_dir="$SCRATCH/trace"
breakdown trace "bfloat16"
kernel_bench loss bfloat16 "the loss alone"
kernel_bench attention bfloat16 "attention alone"
kernel_bench layer_norm bfloat16 "LayerNorm alone"
kernel_bench ffn bfloat16 "the blocks' second halves"
TAG=_pallas_all bench pka bfloat16 256 --config.ce_impl=pallas --config.attention_impl=pallas \
  --config.layer_norm_impl=pallas --config.ffn_impl=pallas --profile_dir="$SCRATCH/trace_all"
breakdown trace_all "bfloat16 with every Pallas kernel"
TAG=_pallas_loss bench pka bfloat16 256 --config.ce_impl=pallas
TAG=_pallas_attention bench pka bfloat16 256 --config.attention_impl=pallas
TAG=_pallas_both bench pka bfloat16 256 --config.ce_impl=pallas --config.attention_impl=pallas
kernel_bench loss float32 "the loss alone"
if room "attention check"; then
  echo "=== attention check" | tee -a "$OUT/log.txt"
  timeout "$LIMIT" "$PYTHON" -m experiments.kernels.attention_check --config=configs/ml1m.py \
    --synthetic_items=3416 --config.dtype=bfloat16 --models=pka,sasrec,rope 2>&1 | log
fi
bench pka float32 256
bench sasrec bfloat16 256
bench sasrec float32 256
bench pka bfloat16 1024
rm -rf "$SCRATCH"
