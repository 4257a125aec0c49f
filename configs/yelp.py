"""Yelp: every model, untuned hyper-parameters (from beauty; none published).

  python -m pka_jax.main --config=configs/yelp.py              # PKA
  python -m pka_jax.main --config=configs/yelp.py:model=sasrec
"""

from configs import beauty, default

# untuned: from beauty (sparse reviews with short histories, like Amazon Beauty).
PER_MODEL = beauty.PER_MODEL


def get_config(arg=None):
  return default.for_dataset('yelp', arg, PER_MODEL)
