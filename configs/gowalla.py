"""Gowalla: every model, untuned hyper-parameters (from beauty; none published).

  python -m pka_jax.main --config=configs/gowalla.py              # PKA
  python -m pka_jax.main --config=configs/gowalla.py:model=sasrec
"""

from configs import beauty, default

# untuned: from beauty (sparse check-ins with short histories, like Amazon Beauty).
PER_MODEL = beauty.PER_MODEL


def get_config(arg=None):
  return default.for_dataset('gowalla', arg, PER_MODEL)
