"""MovieLens-100K: every model, untuned hyper-parameters (from ml1m; none published).

  python -m pka_jax.main --config=configs/ml100k.py              # PKA
  python -m pka_jax.main --config=configs/ml100k.py:model=sasrec
"""

from configs import default, ml1m

# untuned: from ml1m (the same kind of data as MovieLens-1M).
PER_MODEL = ml1m.PER_MODEL


def get_config(arg=None):
  return default.for_dataset('ml100k', arg, PER_MODEL)
