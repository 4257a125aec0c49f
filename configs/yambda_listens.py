"""Yambda-50M listens: every model, untuned hyper-parameters (from ml1m; none published).

  python -m pka_jax.main --config=configs/yambda_listens.py              # PKA
  python -m pka_jax.main --config=configs/yambda_listens.py:model=sasrec
"""

import os
import sys

# ml_collections loads this file by path: make `configs` importable from any directory.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from configs import default, ml1m

# untuned: from ml1m (dense listening histories, like MovieLens-1M).
PER_MODEL = ml1m.PER_MODEL


def get_config(arg=None):
  config = default.get_config()
  config.dataset = 'yambda_listens'
  default.apply_variant(config, arg, per_model=PER_MODEL)
  return config
