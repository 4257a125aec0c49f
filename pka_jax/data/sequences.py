"""Per-user item sequences (CSR arrays) and the split dataset built from them."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SequenceStore:
  """Ragged per-user item sequences: user `u` owns `items[offsets[u]:offsets[u + 1]]`.

  Items are dense ids `1..N` (0 is padding), in time order. Random access makes it a grain
  `RandomAccessDataSource` over users.
  """

  offsets: np.ndarray  # int64 [num_users + 1]
  items: np.ndarray  # int32 [num_interactions]

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, user: int) -> np.ndarray:
    return self.items[self.offsets[user]:self.offsets[user + 1]]

  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  @classmethod
  def from_sorted(cls, user: np.ndarray, item: np.ndarray, num_users: int) -> SequenceStore:
    """Builds the store from interactions already sorted by (user, time)."""
    counts = np.bincount(user, minlength=num_users)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return cls(offsets=offsets, items=np.asarray(item, dtype=np.int32))


@dataclasses.dataclass(frozen=True)
class Events:
  """Held-out interactions in global time order (ties keep the source order)."""

  user: np.ndarray  # int32 [n]
  item: np.ndarray  # int32 [n], 1..N
  timestamp: np.ndarray  # int64 [n]

  def __len__(self) -> int:
    return len(self.user)


@dataclasses.dataclass(frozen=True)
class SplitDataset:
  """What training and evaluation read: train sequences plus held-out events."""

  train: SequenceStore
  valid: Events
  test: Events
  item_ids: np.ndarray  # raw id of dense item k at index k - 1
  user_ids: np.ndarray  # raw id of dense user u at index u
  info: dict  # split boundaries and counts, JSON-serialisable

  @property
  def num_items(self) -> int:
    return len(self.item_ids)

  @property
  def num_users(self) -> int:
    return len(self.user_ids)


SMALLEST_WINDOW = 8


def power_of_two_at_least(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def window_width(longest: int, maxlen: int) -> int:
  """The columns a batch of left-padded windows keeps when the leading all-padding ones are
  trimmed, its longest sequence holding `longest` items: a power of two (at least
  SMALLEST_WINDOW) or maxlen, so that training and evaluation compile a handful of shapes."""
  return min(maxlen, max(SMALLEST_WINDOW, power_of_two_at_least(longest)))
