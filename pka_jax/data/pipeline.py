"""The grain input pipeline: per-user training windows in fixed-shape, reshuffled batches.

An epoch is the training users in a fresh seeded order, cut into `steps_per_epoch` full
batches (DESIGN §2). Each host reads its own slice of the users.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from pka_jax.data.sequences import SequenceStore


def training_window(sequence: np.ndarray, maxlen: int) -> dict[str, np.ndarray]:
  """The last `maxlen + 1` items as right-aligned inputs (left-padded) and next-item targets."""
  window = np.asarray(sequence[-(maxlen + 1):], dtype=np.int32)
  inputs = np.zeros(maxlen, dtype=np.int32)
  targets = np.zeros(maxlen, dtype=np.int32)
  length = len(window) - 1
  if length > 0:
    inputs[maxlen - length:] = window[:-1]
    targets[maxlen - length:] = window[1:]
  return {'inputs': inputs, 'targets': targets}


@dataclasses.dataclass(frozen=True)
class TrainUsers:
  """Random access to the train sequences of users with at least one target."""

  store: SequenceStore

  def __post_init__(self):
    object.__setattr__(self, 'users', np.flatnonzero(self.store.lengths() >= 2))

  def __len__(self) -> int:
    return len(self.users)

  def __getitem__(self, index: int) -> np.ndarray:
    return np.asarray(self.store[int(self.users[index])])


@dataclasses.dataclass(frozen=True)
class MakeWindow(grain.transforms.Map):
  maxlen: int

  def map(self, sequence: np.ndarray) -> dict[str, np.ndarray]:
    return training_window(sequence, self.maxlen)


@dataclasses.dataclass(frozen=True)
class TrainInput:
  """Builds the per-epoch iterators; `batch_size` is global, each host gets its share."""

  store: SequenceStore
  maxlen: int
  batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.batch_size % self.process_count:
      raise ValueError(
          f'batch_size {self.batch_size} must be divisible by {self.process_count} processes')
    if self.steps_per_epoch == 0:
      raise ValueError(
          f'{len(self.users)} training users are fewer than one batch of {self.batch_size}')

  @functools.cached_property
  def users(self) -> TrainUsers:
    return TrainUsers(self.store)

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  @property
  def steps_per_epoch(self) -> int:
    # Every host must run the same number of steps: the smallest slice decides.
    smallest_slice = len(self.users) // self.process_count
    return smallest_slice // self.local_batch_size

  def epoch(self, epoch: int, state: dict | None = None) -> grain.DatasetIterator:
    """Iterator over one epoch's local batches; `state` resumes a partially read epoch."""
    dataset = (
        grain.MapDataset.source(self.users)[self.process_index::self.process_count]
        .shuffle(seed=self.seed * 100_003 + epoch)
        .map(MakeWindow(self.maxlen))
        .batch(self.local_batch_size, drop_remainder=True)
        .slice(slice(0, self.steps_per_epoch)))
    iterator = dataset.to_iter_dataset().__iter__()
    if state is not None:
      iterator.set_state(state)
    return iterator
