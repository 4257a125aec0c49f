"""Data: raw readers, the temporal split, the prepared store and the grain pipeline."""

from __future__ import annotations

import ml_collections

from pka_jax.data import synthetic
from pka_jax.data.sequences import SplitDataset
from pka_jax.data.split import temporal_split


def load_dataset(config: ml_collections.ConfigDict) -> SplitDataset:
  """The split dataset named by `config.dataset`, prepared if needed."""
  if config.dataset != 'synthetic':
    raise ValueError(f'Unknown dataset {config.dataset!r}')
  interactions = synthetic.generate(**config.synthetic)
  return temporal_split(
      interactions, q_valid=config.q_valid, q_test=config.q_test, max_eval=config.max_eval)
