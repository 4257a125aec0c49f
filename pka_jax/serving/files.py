"""What recommending needs besides the parameters, in `WORKDIR/serving/`: the raw item and
user ids, the items' training popularity and every user's history. Written at the end of
training (or on first use, from the run's dataset), so that a workdir moved anywhere can
recommend on its own."""

from __future__ import annotations

import dataclasses
import os
import tempfile

from absl import logging
import jax
import ml_collections
import numpy as np

from pka_jax import data
from pka_jax import files
from pka_jax.data.errors import DataError
from pka_jax.data.sequences import SequenceStore, SplitDataset


SERVING_DIR = 'serving'


SERVING_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ServingData:
  """What recommending needs besides the parameters; dense item `i` is raw `item_ids[i - 1]`."""

  item_ids: np.ndarray  # raw id of dense item i at index i - 1
  user_ids: np.ndarray  # raw id of dense user u at index u
  item_counts: np.ndarray  # int64 [N]: training interactions of dense item i at index i - 1
  histories: SequenceStore  # per dense user: train, then validation, then test items

  @property
  def num_items(self) -> int:
    return len(self.item_ids)

  @classmethod
  def from_dataset(cls, dataset: SplitDataset) -> ServingData:
    counts = np.bincount(np.asarray(dataset.train.items), minlength=dataset.num_items + 1)
    return cls(item_ids=_savable(dataset.item_ids), user_ids=_savable(dataset.user_ids),
               item_counts=counts[1:].astype(np.int64), histories=full_histories(dataset))

  def save(self, workdir: str) -> None:
    """Writes `WORKDIR/serving/` under a temporary name, then renames it into place."""
    directory = os.path.join(workdir, SERVING_DIR)
    arrays = {'item_ids': self.item_ids, 'user_ids': self.user_ids,
              'item_counts': self.item_counts, 'history_offsets': self.histories.offsets,
              'history_items': self.histories.items}
    with files.new_directory(directory) as tmp:
      for name, array in arrays.items():
        np.save(os.path.join(tmp, name + '.npy'), np.asarray(array), allow_pickle=False)
      files.write_json(os.path.join(tmp, 'meta.json'), {
          'format_version': SERVING_FORMAT_VERSION, 'num_items': self.num_items,
          'num_users': len(self.user_ids)})

  @classmethod
  def load(cls, workdir: str) -> ServingData | None:
    """The workdir's serving files (memory-mapped), or None when it has none."""
    directory = os.path.join(workdir, SERVING_DIR)
    if not os.path.exists(os.path.join(directory, 'meta.json')):
      return None

    def load(name):
      return np.load(os.path.join(directory, name + '.npy'), mmap_mode='r', allow_pickle=False)

    return cls(item_ids=load('item_ids'), user_ids=load('user_ids'),
               item_counts=load('item_counts'),
               histories=SequenceStore(offsets=load('history_offsets'),
                                       items=load('history_items')))


def _savable(ids: np.ndarray) -> np.ndarray:
  """Object arrays (pyarrow strings) become fixed-width unicode so they save without pickle."""
  ids = np.array(ids)  # a copy: the dataset's arrays may map files about to be removed
  return ids.astype(str) if ids.dtype == object else ids


def full_histories(dataset: SplitDataset) -> SequenceStore:
  """Every user's items in time order: train, then the user's validation and test events."""
  lengths = dataset.train.lengths()
  users = np.concatenate([np.repeat(np.arange(len(lengths)), lengths),
                          dataset.valid.user, dataset.test.user])
  items = np.concatenate([dataset.train.items, dataset.valid.item, dataset.test.item])
  order = np.argsort(users, kind='stable')  # each user's train items, then events in time order
  return SequenceStore.from_sorted(users[order], items[order], len(lengths))


def write_serving_files(workdir: str, dataset: SplitDataset) -> None:
  """Makes `workdir` self-contained for recommending (process 0 writes, the others return)."""
  if jax.process_index() == 0:
    ServingData.from_dataset(dataset).save(workdir)


def serving_data(workdir: str, config: ml_collections.ConfigDict,
                 data_dir: str | None = None) -> ServingData:
  """The workdir's serving files; for a workdir trained before they existed, builds them from
  the run's dataset (under `data_dir`, default the saved config's) and writes them."""
  served = ServingData.load(workdir)
  if served is not None:
    return served
  logging.info('%s has no serving files: building them from dataset %r', workdir, config.dataset)
  served = _served_from_run_dataset(workdir, config, data_dir)
  try:
    served.save(workdir)
  except OSError as error:  # a read-only workdir still serves, from memory
    logging.warning('Could not write serving files to %s: %s', workdir, error)
  return served


def _served_from_run_dataset(workdir: str, config: ml_collections.ConfigDict,
                             data_dir: str | None) -> ServingData:
  config = ml_collections.ConfigDict(config.to_dict())
  if data_dir is None and config.dataset == 'synthetic':
    # Regenerated from its seed, in a scratch directory rather than the caller's directory.
    with tempfile.TemporaryDirectory() as scratch:
      config.data_dir = scratch
      return ServingData.from_dataset(data.load_dataset(config))
  config.data_dir = data_dir or config.data_dir
  try:
    return ServingData.from_dataset(data.load_dataset(config))
  except DataError as error:
    raise DataError(
        f'{workdir} has no serving files and its dataset could not be loaded from data_dir '
        f'{os.path.abspath(config.data_dir)!r} ({error}); run once from the directory training '
        'ran in, or give --data_dir') from None
