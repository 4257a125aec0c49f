"""Yambda-50M listens: every model, untuned hyper-parameters (from ml1m; none published).

  python -m pka_jax.main --config=configs/yambda_listens.py              # PKA
  python -m pka_jax.main --config=configs/yambda_listens.py:model=sasrec
"""

from configs import default, ml1m

# untuned: from ml1m (dense listening histories, like MovieLens-1M).
PER_MODEL = ml1m.PER_MODEL


def get_config(arg=None):
  # Catalogs of 10^5-10^6 items: full logits would take tens of GB; the blockwise loss
  # is exact and holds one block.
  config = default.for_dataset('yambda_listens', arg, PER_MODEL, ce_block_size=16_384)
  config.search_space.batch_size = (32,)  # the authors searched batches of 32 here
  return config
