"""Yambda-50M likes: every model, untuned hyper-parameters (from beauty; none published).

  python -m pka_jax.main --config=configs/yambda_likes.py              # PKA
  python -m pka_jax.main --config=configs/yambda_likes.py:model=sasrec
"""

from configs import beauty, default

# untuned: from beauty (sparse explicit feedback, closer to Amazon Beauty).
PER_MODEL = beauty.PER_MODEL


def get_config(arg=None):
  return default.for_dataset('yambda_likes', arg, PER_MODEL)
