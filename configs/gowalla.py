"""Gowalla: every model, untuned hyper-parameters (from beauty; none published).

  python -m pka_jax.main --config=configs/gowalla.py              # PKA
  python -m pka_jax.main --config=configs/gowalla.py:model=sasrec
"""

import os
import sys

# ml_collections loads this file by path: make `configs` importable from any directory.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from configs import beauty, default

# untuned: from beauty (sparse check-ins with short histories, like Amazon Beauty).
PER_MODEL = beauty.PER_MODEL


def get_config(arg=None):
  config = default.get_config()
  config.dataset = 'gowalla'
  default.apply_variant(config, arg, per_model=PER_MODEL)
  return config
