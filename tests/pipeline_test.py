"""The grain input pipeline: windows, epochs, reshuffling, resumption and host slices."""

import numpy as np
import pytest

from pka_jax.data.pipeline import TrainInput, training_windows
from pka_jax.data.sequences import SequenceStore


def test_training_windows_right_align_the_last_items():
  store = SequenceStore(offsets=np.array([0, 5, 7, 10]),
                        items=np.array([5, 6, 7, 8, 9, 3, 4, 11, 12, 13], np.int32))
  windows = training_windows(store, np.array([0, 1, 2]), maxlen=4)
  np.testing.assert_array_equal(windows['inputs'], [[5, 6, 7, 8],
                                                    [0, 0, 0, 3], [0, 0, 11, 12]])
  # No target where the input is padding, though the window's first item sits there.
  np.testing.assert_array_equal(windows['targets'], [[6, 7, 8, 9], [0, 0, 0, 4],
                                                     [0, 0, 12, 13]])


def store_of(num_users: int) -> SequenceStore:
  # User u has u + 2 items (its first item is 100 * u + 1); the last user has one item only.
  sequences = [np.arange(u + 2) + 100 * u + 1 for u in range(num_users)] + [np.array([7])]
  offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])])
  return SequenceStore(offsets=offsets, items=np.concatenate(sequences).astype(np.int32))


def first_items(batches) -> list[int]:
  return [int(row[row > 0][0]) for batch in batches for row in batch['inputs']]


def test_epoch_is_each_trainable_user_once_in_full_batches():
  inputs = TrainInput(store_of(10), maxlen=16, batch_size=3, seed=0)
  assert len(inputs.users) == 10  # the one-item user has no target
  assert inputs.steps_per_epoch == 3  # floor(10 / 3)
  batches = list(inputs.epoch(0))
  assert len(batches) == 3 and all(b['inputs'].shape == (3, 16) for b in batches)
  users = first_items(batches)
  assert len(set(users)) == 9 and set(users) <= {100 * u + 1 for u in range(10)}


def test_epochs_are_reshuffled_and_seeded():
  inputs = TrainInput(store_of(30), maxlen=16, batch_size=5, seed=0)
  assert first_items(inputs.epoch(0)) != first_items(inputs.epoch(1))
  assert first_items(inputs.epoch(1)) == first_items(
      TrainInput(store_of(30), maxlen=16, batch_size=5, seed=0).epoch(1))
  assert first_items(inputs.epoch(1)) != first_items(
      TrainInput(store_of(30), maxlen=16, batch_size=5, seed=1).epoch(1))


def test_iterator_state_resumes_mid_epoch():
  inputs = TrainInput(store_of(30), maxlen=16, batch_size=5, seed=0)
  iterator = inputs.epoch(2)
  next(iterator), next(iterator)
  state = iterator.get_state()
  rest = list(iterator)
  resumed = list(inputs.epoch(2, state))
  assert first_items(resumed) == first_items(rest) and len(rest) == inputs.steps_per_epoch - 2


def test_hosts_read_their_rows_of_the_single_host_batches():
  single = TrainInput(store_of(11), maxlen=16, batch_size=4, seed=0)
  hosts = [TrainInput(store_of(11), maxlen=16, batch_size=4, seed=0, process_index=i,
                      process_count=2) for i in range(2)]
  assert {h.steps_per_epoch for h in hosts} == {single.steps_per_epoch} == {2}  # 10 // 4
  for whole, *parts in zip(single.epoch(3), *(h.epoch(3) for h in hosts)):
    for name in ('inputs', 'targets'):
      np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), whole[name])
  seen = [set(first_items(h.epoch(0))) for h in hosts]
  assert not seen[0] & seen[1]


def test_too_few_users_for_one_batch_is_an_error():
  with pytest.raises(ValueError, match='fewer than one batch'):
    TrainInput(store_of(3), maxlen=16, batch_size=8, seed=0)


def test_trimmed_batches_are_the_right_end_of_the_full_windows():
  # 40 users of 3 items and 10 of 30: a batch needs 8 columns (the narrowest) or 32.
  sequences = [np.arange(3 if u < 40 else 30) + 100 * u + 1 for u in range(50)]
  offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])])
  store = SequenceStore(offsets=offsets, items=np.concatenate(sequences).astype(np.int32))
  full = TrainInput(store, maxlen=64, batch_size=5, seed=0)
  trimmed = TrainInput(store, maxlen=64, batch_size=5, seed=0, trim=True)
  widths = set()
  for whole, cut in zip(full.epoch(1), trimmed.epoch(1)):
    longest = max(int((row > 0).sum()) for row in whole['inputs'])
    width = cut['inputs'].shape[1]
    widths.add(width)
    # The narrowest power of two (at least 8) that holds the longest history.
    assert width == max(8, 1 << (longest - 1).bit_length())
    for name in ('inputs', 'targets'):
      np.testing.assert_array_equal(cut[name], whole[name][:, -width:])
      assert not whole[name][:, :-width].any()
  assert widths == {8, 32}


def test_hosts_trim_to_the_width_of_the_whole_batch():
  # Each host reads its own rows but cuts them to what every host's rows need.
  single = TrainInput(store_of(11), maxlen=16, batch_size=4, seed=0, trim=True)
  hosts = [TrainInput(store_of(11), maxlen=16, batch_size=4, seed=0, process_index=i,
                      process_count=2, trim=True) for i in range(2)]
  for whole, *parts in zip(single.epoch(3), *(h.epoch(3) for h in hosts)):
    for name in ('inputs', 'targets'):
      np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), whole[name])
