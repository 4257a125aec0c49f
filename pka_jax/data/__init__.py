"""Data: raw readers, the temporal split, the prepared store and the grain pipeline."""

from __future__ import annotations

import ml_collections

from pka_jax.data import prepare, synthetic
from pka_jax.data.sequences import SplitDataset
from pka_jax.data.split import temporal_split


def load_dataset(config: ml_collections.ConfigDict) -> SplitDataset:
  """The split dataset named by `config.dataset`, prepared under `config.data_dir` if needed.

  Raises `DataError` (its subclass `DataUnavailableError` when the raw file is missing) with a
  message meant for the user.
  """
  if config.dataset == 'synthetic':
    interactions = synthetic.generate(**config.synthetic)
    return temporal_split(
        interactions, q_valid=config.q_valid, q_test=config.q_test, max_eval=config.max_eval)
  split = prepare.SplitSettings(
      q_valid=config.q_valid, q_test=config.q_test, max_eval=config.max_eval)
  return prepare.load_prepared(config.dataset, config.data_dir, split=split)
