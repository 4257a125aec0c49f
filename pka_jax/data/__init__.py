"""Data: raw readers, the temporal split, the prepared store and the grain pipeline."""

from __future__ import annotations

import dataclasses

import jax
from jax.experimental import multihost_utils
import ml_collections

from pka_jax.data import prepare, store, synthetic
from pka_jax.data.sequences import SplitDataset


def load_dataset(config: ml_collections.ConfigDict) -> SplitDataset:
  """The split dataset named by `config.dataset`, prepared under `config.data_dir` if needed.

  Raises `DataError` (its subclass `DataUnavailableError` when the raw file is missing) with a
  message meant for the user.
  """
  split = prepare.SplitSettings(
      q_valid=config.q_valid, q_test=config.q_test, max_eval=config.max_eval)
  if config.dataset != 'synthetic':
    return prepare.load_prepared(config.dataset, config.data_dir, split=split)
  # The generated data takes the real datasets' path: split, prepared store, memory map.
  settings = {'synthetic': config.synthetic.to_dict(), 'split': dataclasses.asdict(split)}

  def build():
    interactions = synthetic.generate(**config.synthetic)
    return interactions, {'preprocessed': prepare.interaction_stats(interactions)}, {}

  prepared = prepare.prepare_store('synthetic', config.data_dir, settings=settings,
                                   raw_files=[], split=split, build=build)
  return store.load_split(prepared.directory)


def load_dataset_once(config: ml_collections.ConfigDict) -> SplitDataset:
  """Process 0 prepares the dataset while the others wait, then they all load it."""
  if jax.process_count() == 1:
    return load_dataset(config)
  if jax.process_index() == 0:
    dataset = load_dataset(config)
  multihost_utils.sync_global_devices('pka_jax: dataset prepared')
  if jax.process_index() != 0:
    dataset = load_dataset(config)
  return dataset
