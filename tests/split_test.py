"""The global temporal split on hand-made examples (docs/design.md §3)."""

import numpy as np
import pytest

from pka_jax.data.interactions import Interactions
from pka_jax.data.split import split_quantiles, temporal_split


def test_quantiles_follow_the_protocol_and_cap():
  e, r = split_quantiles(1000, 0.95, 0.97, 50_000)
  assert e == pytest.approx(0.92) and r == pytest.approx(0.625)  # 5% valid, 3% test
  # 10M interactions: 5% would be 500k validation steps; the cap makes it 50k.
  e, r = split_quantiles(10_000_000, 0.95, 0.97, 50_000)
  assert 10_000_000 * (1 - e) * r == pytest.approx(50_000)


def hand_example() -> Interactions:
  # Twenty interactions at times 0..19, given out of time order. Users are letters, items
  # numbers; item 99 appears only at time 14 (a cold item), user 'z' only at time 19.
  times = np.array([5, 0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
  users = np.array(['a', 'a', 'b', 'a', 'b', 'c', 'a', 'b', 'c', 'a', 'b', 'c', 'a', 'b', 'c',
                    'a', 'b', 'c', 'a', 'z'])
  items = np.array([15, 10, 11, 12, 13, 14, 16, 17, 18, 10, 11, 12, 13, 14, 99,
                    15, 16, 17, 18, 10])
  return Interactions.from_raw(users, items, times)


def decode(dataset, events):
  return [(str(dataset.user_ids[u]), int(dataset.item_ids[i - 1]), int(t))
          for u, i, t in zip(events.user, events.item, events.timestamp)]


def test_split_without_cap():
  # e = 0.8 + 0.9 - 1 = 0.7 -> 'nearest' quantile of 0..19 at 13.3 is 13: train is times 0..12.
  # r = 0.2 / 0.3 -> rest 13..19, quantile at position 4 is 17: valid 13..16, test 17..19.
  dataset = temporal_split(hand_example(), q_valid=0.8, q_test=0.9, max_eval=1000)
  assert dataset.info['train_end_time'] == 13 and dataset.info['valid_end_time'] == 17
  assert list(dataset.item_ids) == [10, 11, 12, 13, 14, 15, 16, 17, 18]  # 99 is never trained
  assert decode(dataset, dataset.valid) == [('b', 14, 13), ('a', 15, 15), ('b', 16, 16)]
  assert decode(dataset, dataset.test) == [('c', 17, 17), ('a', 18, 18), ('z', 10, 19)]
  assert dataset.info['num_dropped_cold_items'] == 1  # ('c', 99, 14)
  train = {str(dataset.user_ids[u]): list(dataset.item_ids[dataset.train[u] - 1])
           for u in range(dataset.num_users)}
  # Time order within each user, whatever the input order; 'z' has no train history.
  assert train == {'a': [10, 12, 15, 16, 10, 13], 'b': [11, 13, 17, 11], 'c': [14, 18, 12],
                   'z': []}


def test_split_with_cap():
  # Cap 2: r = 2/3 > 2 / (20 * 0.3), so e = 1 - 2 / (20 * 2/3) = 0.85 -> position 16.15 -> 16.
  # The rest 16..19 splits at position 2 (time 18): validation has exactly the cap.
  dataset = temporal_split(hand_example(), q_valid=0.8, q_test=0.9, max_eval=2)
  assert dataset.info['train_end_time'] == 16
  assert decode(dataset, dataset.valid) == [('b', 16, 16), ('c', 17, 17)]
  assert decode(dataset, dataset.test) == [('a', 18, 18), ('z', 10, 19)]
  assert 99 in dataset.item_ids  # now inside train
  assert dataset.info['num_train'] == 16


def test_empty_input_is_rejected():
  empty = Interactions.from_raw(np.array([], int), np.array([], int), np.array([], int))
  with pytest.raises(ValueError, match='no interactions'):
    temporal_split(empty)
