"""The paper's global temporal split (docs/design.md §3).

Train holds every interaction before the `e`-quantile of time; the rest is split at its
`r`-quantile into validation (earlier) and test (later). The quantiles are chosen so that
validation and test are the fractions `1 - q_valid` and `1 - q_test` of the data, with validation
capped at `max_eval` interactions. Items unseen in train are dropped from the held-out parts;
users unseen in train stay (their first held-out item only joins their context).
"""

from __future__ import annotations

import numpy as np

from pka_jax.data.interactions import Interactions
from pka_jax.data.sequences import Events, SequenceStore, SplitDataset


def split_quantiles(n: int, q_valid: float, q_test: float, max_eval: int) -> tuple[float, float]:
  """Returns `(e, r)`: the train quantile of time and the validation quantile of the rest."""
  e = q_test + q_valid - 1.0
  r = (1.0 - q_valid) / (1.0 - e)
  if r > max_eval / (n * (1.0 - e)):
    e = 1.0 - max_eval / (n * r)
  return e, r


def _used_codes(codes: np.ndarray, size: int) -> np.ndarray:
  """The distinct codes in increasing order (np.unique without its sort: codes are dense)."""
  return np.flatnonzero(np.bincount(codes, minlength=size))


def _time_quantile(timestamp: np.ndarray, q: float) -> int:
  return int(np.quantile(timestamp, q, method='nearest'))


def temporal_split(
    interactions: Interactions,
    *,
    q_valid: float = 0.95,
    q_test: float = 0.97,
    max_eval: int = 50_000,
) -> SplitDataset:
  """Splits interactions globally by time and encodes items `1..N` from the train part."""
  n = len(interactions)
  if n == 0:
    raise ValueError('temporal_split: no interactions to split')
  order = np.argsort(interactions.timestamp, kind='stable')
  user = interactions.user[order]
  item = interactions.item[order]
  time = interactions.timestamp[order]

  e, r = split_quantiles(n, q_valid, q_test, max_eval)
  train_end = _time_quantile(time, e)
  is_train = time < train_end
  if not is_train.any():
    raise ValueError(f'temporal_split: no interaction before the train boundary {train_end}')
  rest_time = time[~is_train]
  valid_end = _time_quantile(rest_time, r) if len(rest_time) else train_end
  is_valid = ~is_train & (time < valid_end)
  is_test = ~is_train & (time >= valid_end)

  train_items = _used_codes(item[is_train], len(interactions.item_ids))
  dense_item = np.zeros(len(interactions.item_ids), dtype=np.int32)
  dense_item[train_items] = np.arange(1, len(train_items) + 1, dtype=np.int32)
  known = dense_item[item] > 0
  is_valid &= known
  is_test &= known

  kept = is_train | is_valid | is_test
  kept_users = _used_codes(user[kept], len(interactions.user_ids))
  user_of = np.full(len(interactions.user_ids), -1, dtype=np.int64)
  user_of[kept_users] = np.arange(len(kept_users))
  num_users = len(kept_users)

  train_user = user_of[user[is_train]]
  by_user = np.argsort(train_user, kind='stable')  # stable: keeps time order within a user
  train = SequenceStore.from_sorted(
      train_user[by_user], dense_item[item[is_train]][by_user], num_users)

  def events(mask):
    return Events(
        user=user_of[user[mask]].astype(np.int32),
        item=dense_item[item[mask]],
        timestamp=time[mask])

  valid, test = events(is_valid), events(is_test)
  info = {
      'q_valid': q_valid, 'q_test': q_test, 'max_eval': max_eval,
      'train_quantile': e, 'valid_quantile_of_rest': r,
      'train_end_time': train_end, 'valid_end_time': valid_end,
      'num_raw_interactions': n,
      'num_train': int(is_train.sum()), 'num_valid': len(valid), 'num_test': len(test),
      'num_dropped_cold_items': int((~kept).sum()),
  }
  return SplitDataset(
      train=train, valid=valid, test=test,
      item_ids=interactions.item_ids[train_items],
      user_ids=interactions.user_ids[kept_users],
      info=info)
