"""The grain input pipeline: per-user training windows in fixed-shape, reshuffled batches.

An epoch is the training users in a fresh seeded order, cut into `steps_per_epoch` full
batches (docs/design.md §2). Each host reads its own rows of every batch.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from pka_jax.data.sequences import SequenceStore, window_width


def training_windows(store: SequenceStore, users_B: np.ndarray, maxlen: int
                     ) -> dict[str, np.ndarray]:
  """Each user's last `maxlen + 1` items as right-aligned inputs (left-padded with 0) and the
  next-item targets (0 wherever the input is padding): one gather for the whole batch.

  `maxlen` may be less than the model's: the windows are then the last columns of the
  model's (`trimmed_width`)."""
  end_B = store.offsets[users_B + 1]
  begin_B = store.offsets[users_B]
  index_BxW = end_B[:, None] - (maxlen + 1) + np.arange(maxlen + 1)[None, :]
  real_BxW = index_BxW >= begin_B[:, None]
  window_BxW = np.where(real_BxW, store.items[np.where(real_BxW, index_BxW, 0)], 0)
  inputs_BxT = window_BxW[:, :-1].astype(np.int32)
  targets_BxT = np.where(inputs_BxT != 0, window_BxW[:, 1:], 0).astype(np.int32)
  return {'inputs': inputs_BxT, 'targets': targets_BxT}


def trimmed_width(store: SequenceStore, users_B: np.ndarray, maxlen: int,
                  padding_column: bool = False) -> int:
  """The window the batch of `users_B` needs: the columns that are not padding in every row
  (rounded up by window_width), and one more with `padding_column`, so that every row that
  is not full keeps one. A user of `n` items has `n - 1` inputs."""
  longest = int((store.offsets[users_B + 1] - store.offsets[users_B]).max()) - 1
  return window_width(longest + int(padding_column), maxlen)


@dataclasses.dataclass(frozen=True)
class BatchOfEpoch(grain.transforms.Map):
  """This host's rows of batch `i` of an epoch: the training windows of users
  `order[i·B + first : i·B + first + rows]`, `maxlen` wide or, with `trim`, as wide as the
  whole batch (every host's rows) needs."""

  store: SequenceStore
  order: np.ndarray  # every user, in the epoch's order
  batch_size: int  # B, over all hosts
  first: int  # this host's first row of each batch
  rows: int  # this host's rows of each batch

  maxlen: int
  trim: bool = False
  padding_column: bool = False

  def map(self, index: int) -> dict[str, np.ndarray]:
    width = self.maxlen
    if self.trim:
      batch = self.order[index * self.batch_size:(index + 1) * self.batch_size]
      width = trimmed_width(self.store, batch, self.maxlen, self.padding_column)
    start = index * self.batch_size + self.first
    return training_windows(self.store, self.order[start:start + self.rows], width)


@dataclasses.dataclass(frozen=True)
class TrainInput:
  """Builds the per-epoch iterators; `batch_size` is global, each host gets its share."""

  store: SequenceStore
  maxlen: int
  batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1
  # Windows cut to the columns their batch needs (exact only for a model that
  # trims_in_training), keeping a padding column in every row that is not full if asked.
  trim: bool = False
  padding_column: bool = False

  def __post_init__(self):
    if self.batch_size % self.process_count:
      raise ValueError(
          f'batch_size {self.batch_size} must be divisible by {self.process_count} processes')
    if self.steps_per_epoch == 0:
      raise ValueError(
          f'{len(self.users)} training users are fewer than one batch of {self.batch_size}')

  @functools.cached_property
  def users(self) -> np.ndarray:
    """The users with at least one target (two items or more)."""
    return np.flatnonzero(self.store.lengths() >= 2)

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  @property
  def steps_per_epoch(self) -> int:
    return len(self.users) // self.batch_size

  def epoch(self, epoch: int, state: dict | None = None) -> grain.DatasetIterator:
    """Iterator over this host's rows of one epoch's batches; `state` resumes a partially
    read epoch.

    The epoch's order is one seeded numpy permutation of all the users, the same on every
    host, so the batches do not depend on how many hosts share them; each host reads the
    sequences of its own rows only. grain serves the batches (and their iterator state):
    shuffling and batching element by element in grain cost ~40 µs a user, more than the
    training step itself on an accelerator.
    """
    order = np.random.default_rng([self.seed, epoch]).permutation(self.users)
    dataset = grain.MapDataset.range(self.steps_per_epoch).map(BatchOfEpoch(
        self.store, order, self.batch_size, first=self.process_index * self.local_batch_size,
        rows=self.local_batch_size, maxlen=self.maxlen, trim=self.trim,
        padding_column=self.padding_column))
    iterator = dataset.to_iter_dataset().__iter__()
    if state is not None:
      iterator.set_state(state)
    return iterator
