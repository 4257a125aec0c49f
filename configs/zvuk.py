"""Zvuk: every model, untuned hyper-parameters (from ml1m; none published).

  python -m pka_jax.main --config=configs/zvuk.py              # PKA
  python -m pka_jax.main --config=configs/zvuk.py:model=sasrec
"""

from configs import default, ml1m

# untuned: from ml1m (dense listening histories, like MovieLens-1M).
PER_MODEL = ml1m.PER_MODEL


def get_config(arg=None):
  return default.for_dataset('zvuk', arg, PER_MODEL)
