"""The raw-interaction table every reader produces and the split consumes."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Interactions:
  """Interactions as parallel arrays of dense codes.

  `user[i]` and `item[i]` index `user_ids` and `item_ids`, which hold the raw identifiers
  (ints or strings) as they appear in the source file. `timestamp` is int64 in any unit in
  which larger means later (seconds for every reader here).
  """

  user: np.ndarray
  item: np.ndarray
  timestamp: np.ndarray
  user_ids: np.ndarray
  item_ids: np.ndarray

  def __post_init__(self):
    n = len(self.user)
    if len(self.item) != n or len(self.timestamp) != n:
      raise ValueError(
          f'Interactions: user/item/timestamp lengths differ ({n}, {len(self.item)}, '
          f'{len(self.timestamp)})')

  def __len__(self) -> int:
    return len(self.user)

  @classmethod
  def from_raw(cls, users, items, timestamps) -> Interactions:
    """Encodes raw identifier arrays (any sortable dtype) into dense codes."""
    user_ids, user = np.unique(np.asarray(users), return_inverse=True)
    item_ids, item = np.unique(np.asarray(items), return_inverse=True)
    return cls(
        user=user.astype(np.int64).ravel(),
        item=item.astype(np.int64).ravel(),
        timestamp=np.asarray(timestamps, dtype=np.int64),
        user_ids=user_ids,
        item_ids=item_ids)
