"""Gowalla: every model, untuned hyper-parameters (from beauty; none published).

  python -m pka_jax.main --config=configs/gowalla.py              # PKA
  python -m pka_jax.main --config=configs/gowalla.py:model=sasrec
"""

from configs import beauty, default

# untuned: from beauty (sparse check-ins with short histories, like Amazon Beauty).
PER_MODEL = beauty.PER_MODEL


def get_config(arg=None):
  # Catalogs of 10^5-10^6 items: full logits would take tens of GB; the blockwise loss
  # is exact and holds one block.
  return default.for_dataset('gowalla', arg, PER_MODEL, ce_block_size=16_384)
