"""MovieLens-20M: every model, untuned hyper-parameters (from ml1m; none published).

  python -m pka_jax.main --config=configs/ml20m.py              # PKA
  python -m pka_jax.main --config=configs/ml20m.py:model=sasrec
"""

from configs import default, ml1m

# untuned: from ml1m (the same kind of data as MovieLens-1M).
PER_MODEL = ml1m.PER_MODEL


def get_config(arg=None):
  return default.for_dataset('ml20m', arg, PER_MODEL)
