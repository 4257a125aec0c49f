"""The successive protocol on a hand-worked example."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pka_jax import evaluate
from pka_jax.data.sequences import Events, SequenceStore, SplitDataset

jax.config.update('jax_numpy_rank_promotion', 'raise')

NUM_ITEMS = 6
MAXLEN = 3


def _events(rows):
  user, item, timestamp = (np.array(column) for column in zip(*rows))
  return Events(user=user.astype(np.int32), item=item.astype(np.int32), timestamp=timestamp)


def _dataset() -> SplitDataset:
  """Users 0..3. User 0 repeats item 2 in train; users 2 and 3 have no train history."""
  train = {0: [1, 2, 3, 2], 1: [4, 5], 2: [], 3: []}
  user = np.concatenate([np.full(len(items), u) for u, items in train.items()])
  item = np.concatenate([np.array(items, dtype=np.int32) for items in train.values()])
  valid = _events([(2, 3, 10), (0, 5, 11), (2, 6, 12), (1, 1, 13), (0, 1, 14)])
  test = _events([(1, 3, 20), (2, 1, 21), (0, 4, 22), (3, 2, 23)])
  return SplitDataset(
      train=SequenceStore.from_sorted(user, item, num_users=4),
      valid=valid,
      test=test,
      item_ids=np.arange(100, 100 + NUM_ITEMS),
      user_ids=np.arange(4),
      info={})


@jax.jit
def _score_next_of_last(inputs_BxT):
  """Score -j for item j, plus 100 for the item `last % 6 + 1` after the last input item.

  Column 0 (padding) scores 0, the best base score, so it must be masked.
  """
  items_1xV = jnp.arange(NUM_ITEMS + 1)[None, :]
  next_Bx1 = (inputs_BxT[:, -1] % NUM_ITEMS + 1)[:, None]
  return (-items_1xV + 100 * (items_1xV == next_Bx1)).astype(jnp.float32)


def _batches(part, batch_size):
  steps = evaluate.successive_steps(_dataset(), part, maxlen=MAXLEN)
  return list(steps.batches(batch_size))


def _assert_batch(batch, inputs, targets, seen, valid):
  for name, got, want in zip(
      ('inputs', 'targets', 'seen', 'valid'), batch, (inputs, targets, seen, valid)):
    np.testing.assert_array_equal(got, np.array(want), err_msg=name)
  assert batch.inputs_BxT.dtype == np.int32
  assert batch.targets_B.dtype == np.int32
  assert batch.seen_BxS.dtype == np.int32


def test_valid_steps_exactly():
  # valid in time order: (u2, 3) skipped: empty context; (u0, 5); (u2, 6); (u1, 1); (u0, 1).
  first, second = _batches('valid', batch_size=3)
  # Contexts [1 2 3 2], [3], [4 5]; the longest has 4 items so S = 4.
  _assert_batch(
      first,
      inputs=[[2, 3, 2], [0, 0, 3], [0, 4, 5]],
      targets=[5, 6, 1],
      seen=[[1, 2, 3, 2], [3, 0, 0, 0], [4, 5, 0, 0]],
      valid=[True, True, True])
  # Context [1 2 3 2 5]: item 1 is outside the last MAXLEN items but still seen; S = 8.
  # Two padding rows fill the batch.
  _assert_batch(
      second,
      inputs=[[3, 2, 5], [0, 0, 0], [0, 0, 0]],
      targets=[1, 0, 0],
      seen=[[1, 2, 3, 2, 5, 0, 0, 0], [0] * 8, [0] * 8],
      valid=[True, False, False])


def test_test_steps_include_validation_items():
  # test in time order: (u1, 3); (u2, 1); (u0, 4); (u3, 2) skipped: no history at all.
  (batch,) = _batches('test', batch_size=4)
  _assert_batch(
      batch,
      inputs=[[4, 5, 1], [0, 3, 6], [2, 5, 1], [0, 0, 0]],
      targets=[3, 1, 4, 0],
      seen=[[4, 5, 1, 0, 0, 0, 0, 0],
            [3, 6, 0, 0, 0, 0, 0, 0],
            [1, 2, 3, 2, 5, 1, 0, 0],
            [0] * 8],
      valid=[True, True, True, False])


def test_seen_width_is_at_least_maxlen():
  steps = evaluate.successive_steps(_dataset(), 'valid', maxlen=5)
  assert steps.batch(0, batch_size=2).seen_BxS.shape == (2, 8)  # 5 rounds up to 8
  assert len(steps) == 4 and steps.num_batches(3) == 2


def test_unknown_part():
  with pytest.raises(ValueError, match='part'):
    evaluate.successive_steps(_dataset(), 'train', maxlen=MAXLEN)


# Top 3 lists on 'valid' after masking column 0 and the whole context:
#   u0 [1 2 3 2] last 2 -> bonus 3 (seen); [4 5 6], target 5 at rank 1.
#   u2 [3]       last 3 -> bonus 4;        [4 1 2], target 6 missed.
#   u1 [4 5]     last 5 -> bonus 6;        [6 1 2], target 1 at rank 1.
#   u0 [.. 5]    last 5 -> bonus 6;        [6 4 -], target 1 seen (beyond MAXLEN): missed.
# Ranks [1, miss, 1, miss]; lists cover {1, 2, 4, 5, 6}.
VALID_METRICS = {
    'hr@3': 0.5,
    'ndcg@3': 2 / math.log2(3) / 4,
    'mrr@3': (0.5 + 0.5) / 4,
    'hr@3_se': math.sqrt((4 * 0.25 / 3) / 4),  # sample variance of [1 0 1 0] is 1/3
    'ndcg@3_se': (1 / math.log2(3)) * math.sqrt((4 * 0.25 / 3) / 4),
    'mrr@3_se': 0.5 * math.sqrt((4 * 0.25 / 3) / 4),
    'cov@3': 5 / 6,
    'num_steps': 4,
}


@pytest.mark.parametrize('batch_size', [1, 3, 8])
def test_evaluate_valid_hand_worked(batch_size):
  summary = evaluate.evaluate(
      _score_next_of_last, _dataset(), 'valid', maxlen=MAXLEN, batch_size=batch_size, top_k=3)
  assert summary.keys() == VALID_METRICS.keys()
  for key, value in VALID_METRICS.items():
    assert summary[key] == pytest.approx(value), key


def test_evaluate_test_hand_worked():
  # u1 [4 5 1]         last 1 -> bonus 2; [2 3 6], target 3 at rank 1.
  # u2 [3 6]           last 6 -> bonus 1; [1 2 4], target 1 at rank 0.
  # u0 [1 2 3 2 5 1]   last 1 -> bonus 2 (seen); [4 6 -], target 4 at rank 0.
  summary = evaluate.evaluate(
      _score_next_of_last, _dataset(), 'test', maxlen=MAXLEN, batch_size=2, top_k=3)
  assert summary['num_steps'] == 3
  assert summary['hr@3'] == pytest.approx(1.0)
  assert summary['hr@3_se'] == pytest.approx(0.0)
  assert summary['ndcg@3'] == pytest.approx((1 / math.log2(3) + 2) / 3)
  assert summary['mrr@3'] == pytest.approx((0.5 + 2) / 3)
  assert summary['cov@3'] == pytest.approx(5 / 6)  # {1, 2, 3, 4, 6}


def test_empty_list_slots_never_hit():
  # Items 1 and 2 are seen, so only item 3 is left; the target 1 sits in an -inf slot.
  scores_BxV = jnp.array([[0.0, 5.0, 4.0, 3.0]])
  top_items_BxK, ranks_B = evaluate.top_k_ranks(
      scores_BxV, jnp.array([[1, 2]]), jnp.array([1]), top_k=3)
  np.testing.assert_array_equal(top_items_BxK, [[3, 0, 0]])
  np.testing.assert_array_equal(ranks_B, [-1])


def test_wrong_vocabulary_size_is_rejected():
  with pytest.raises(ValueError, match='num_items'):
    evaluate.evaluate(
        lambda inputs_BxT: jnp.zeros((inputs_BxT.shape[0], NUM_ITEMS)),
        _dataset(), 'valid', maxlen=MAXLEN, batch_size=4)
