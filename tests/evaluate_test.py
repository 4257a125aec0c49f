"""The successive protocol on a hand-worked example."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pka_jax.data.sequences import Events, SequenceStore, SplitDataset
from pka_jax.evaluation import protocol
from pka_jax.evaluation import ranking

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
  steps = protocol.successive_steps(_dataset(), part, maxlen=MAXLEN)
  return list(steps.batches(batch_size))


def _seen_lists(batch, rows_per_block):
  """Each row's seen items, in order, from the batch's (row within block, item) pairs."""
  lists = [[] for _ in range(len(batch.inputs_BxT))]
  width = len(batch.seen_rows_P) // (len(batch.inputs_BxT) // rows_per_block)
  for pair, (row, item) in enumerate(zip(batch.seen_rows_P, batch.seen_items_P)):
    if item:
      lists[pair // width * rows_per_block + row].append(int(item))
  return lists


def _assert_batch(batch, inputs, targets, seen, valid, pairs):
  np.testing.assert_array_equal(batch.inputs_BxT, inputs)
  np.testing.assert_array_equal(batch.targets_B, targets)
  np.testing.assert_array_equal(batch.valid_B, valid)
  assert _seen_lists(batch, len(inputs)) == seen
  assert len(batch.seen_rows_P) == len(batch.seen_items_P) == pairs  # a power of two
  for array in (batch.inputs_BxT, batch.targets_B, batch.seen_rows_P, batch.seen_items_P):
    assert array.dtype == np.int32


def test_valid_steps_exactly():
  # valid in time order: (u2, 3) skipped: empty context; (u0, 5); (u2, 6); (u1, 1); (u0, 1).
  first, second = _batches('valid', batch_size=3)
  # Contexts [1 2 3 2], [3], [4 5]: 7 seen (row, item) pairs, padded to 8.
  _assert_batch(
      first,
      inputs=[[2, 3, 2], [0, 0, 3], [0, 4, 5]],
      targets=[5, 6, 1],
      seen=[[1, 2, 3, 2], [3], [4, 5]],
      valid=[True, True, True], pairs=8)
  # Context [1 2 3 2 5]: item 1 is outside the last MAXLEN items but still seen (5 pairs,
  # padded to 8). Two padding rows fill the batch.
  _assert_batch(
      second,
      inputs=[[3, 2, 5], [0, 0, 0], [0, 0, 0]],
      targets=[1, 0, 0],
      seen=[[1, 2, 3, 2, 5], [], []],
      valid=[True, False, False], pairs=8)


def test_test_steps_include_validation_items():
  # test in time order: (u1, 3); (u2, 1); (u0, 4); (u3, 2) skipped: no history at all.
  (batch,) = _batches('test', batch_size=4)
  _assert_batch(
      batch,
      inputs=[[4, 5, 1], [0, 3, 6], [2, 5, 1], [0, 0, 0]],
      targets=[3, 1, 4, 0],
      seen=[[4, 5, 1], [3, 6], [1, 2, 3, 2, 5, 1], []],
      valid=[True, True, True, False], pairs=16)  # 11 pairs


def test_rows_come_in_blocks_a_host_builds_only_its_own():
  steps = protocol.successive_steps(_dataset(), 'test', maxlen=MAXLEN)
  whole = steps.batch(0, 4, shards=2)
  # Blocks of 2 rows: pairs 3 + 2 and 6 + 0, each block padded to 8; rows within a block.
  assert len(whole.seen_rows_P) == 16
  assert _seen_lists(whole, 2) == [[4, 5, 1], [3, 6], [1, 2, 3, 2, 5, 1], []]
  assert int(whole.seen_rows_P[8:].max()) == 0  # the second block's rows are 0 and 1
  second = steps.batch(0, 4, shards=2, held=[1])
  np.testing.assert_array_equal(second.inputs_BxT, whole.inputs_BxT[2:])
  np.testing.assert_array_equal(second.targets_B, whole.targets_B[2:])
  np.testing.assert_array_equal(second.seen_items_P, whole.seen_items_P[8:])
  np.testing.assert_array_equal(second.valid_B, whole.valid_B)  # every row's, for the results
  assert len(steps) == 3 and steps.num_batches(2) == 2


def test_window_widths_are_powers_of_two_up_to_maxlen():
  assert [protocol.window_width(n, 128) for n in (1, 8, 9, 16, 17, 100, 128, 500)] == [
      8, 8, 16, 16, 32, 128, 128, 128]
  assert protocol.window_width(5, 6) == 6  # never wider than maxlen


def test_trimmed_batches_run_shortest_context_first_in_narrow_windows():
  # valid contexts: [1 2 3 2], [3], [4 5], [1 2 3 2 5]; shortest first: 1, 2, 4, 5 items.
  steps = protocol.successive_steps(_dataset(), 'valid', maxlen=20).by_context_length()
  np.testing.assert_array_equal(steps.target, [6, 1, 5, 1])
  first, second = steps.batches(2, trim=True)
  # Every window is the last 8 columns (the narrowest) of the 20-wide one, and every seen
  # item is still listed.
  _assert_batch(first, inputs=[[0] * 7 + [3], [0] * 6 + [4, 5]], targets=[6, 1],
                seen=[[3], [4, 5]], valid=[True, True], pairs=4)
  _assert_batch(second, inputs=[[0] * 4 + [1, 2, 3, 2], [0] * 3 + [1, 2, 3, 2, 5]],
                targets=[5, 1], seen=[[1, 2, 3, 2], [1, 2, 3, 2, 5]], valid=[True, True],
                pairs=16)
  full = protocol.successive_steps(_dataset(), 'valid', maxlen=20).by_context_length()
  np.testing.assert_array_equal(full.batch(0, 2).inputs_BxT[:, -8:], first.inputs_BxT)
  assert not full.batch(0, 2).inputs_BxT[:, :-8].any()


@pytest.mark.parametrize('batch_size', [1, 3])
def test_trimmed_evaluation_gives_the_hand_worked_metrics(batch_size):
  # The scorer reads the newest item only, so any window shows it the same: the metrics of
  # the steps in another order and narrower windows are the hand-worked ones.
  summary = protocol.evaluate(_score_next_of_last, _dataset(), 'valid', maxlen=MAXLEN,
                              batch_size=batch_size, top_k=3, trim=True)
  assert summary == pytest.approx(VALID_METRICS)


def test_unknown_part():
  with pytest.raises(ValueError, match='part'):
    protocol.successive_steps(_dataset(), 'train', maxlen=MAXLEN)


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
  summary = protocol.evaluate(
      _score_next_of_last, _dataset(), 'valid', maxlen=MAXLEN, batch_size=batch_size, top_k=3)
  assert summary.keys() == VALID_METRICS.keys()
  for key, value in VALID_METRICS.items():
    assert summary[key] == pytest.approx(value), key


def test_evaluate_test_hand_worked():
  # u1 [4 5 1]         last 1 -> bonus 2; [2 3 6], target 3 at rank 1.
  # u2 [3 6]           last 6 -> bonus 1; [1 2 4], target 1 at rank 0.
  # u0 [1 2 3 2 5 1]   last 1 -> bonus 2 (seen); [4 6 -], target 4 at rank 0.
  summary = protocol.evaluate(
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
  top_items_BxK, ranks_B = ranking.top_k_ranks(
      scores_BxV, jnp.array([[1, 2]]), jnp.array([1]), top_k=3)
  np.testing.assert_array_equal(top_items_BxK, [[3, 0, 0]])
  np.testing.assert_array_equal(ranks_B, [-1])


def test_wrong_vocabulary_size_is_rejected():
  with pytest.raises(ValueError, match='num_items'):
    protocol.evaluate(
        lambda inputs_BxT: jnp.zeros((inputs_BxT.shape[0], NUM_ITEMS)),
        _dataset(), 'valid', maxlen=MAXLEN, batch_size=4)


@pytest.mark.parametrize('block_size', [1, 3, 7, 64])
def test_block_top_k_equals_a_dense_ranking(block_size):
  # 7 items (ids 1..7) in a 9-row table: rows 8 and the padding row 0 never come out.
  keys = jax.random.split(jax.random.key(3), 2)
  hidden_BxD = jax.random.normal(keys[0], (3, 4))
  table_RxD = jax.random.normal(keys[1], (9, 4))
  seen = {0: [2, 5], 1: [], 2: [1, 2, 3, 4, 5]}
  rows_P = jnp.array([r for r, items in seen.items() for _ in items], jnp.int32)
  items_P = jnp.array([i for items in seen.values() for i in items], jnp.int32)
  boost_V = jnp.arange(10.0)

  def adjust(scores_BxK, item_K):  # the third row ranks by item id instead
    return jnp.where(jnp.arange(3)[:, None] == 2, boost_V[jnp.minimum(item_K, 9)], scores_BxK)

  scores_BxK, items_BxK = ranking.block_top_k(
      hidden_BxD, table_RxD, rows_P, items_P, first=0, num_items=7, top_k=4,
      block_size=block_size, adjust=adjust)
  dense = np.array(hidden_BxD @ table_RxD.T)
  dense[2] = np.arange(9.0)
  for row, items in seen.items():
    ranked = [i for i in np.argsort(-dense[row], kind='stable') if 1 <= i <= 7 and i not in items]
    want = ranked[:4] + [None] * (4 - len(ranked[:4]))
    got = [int(i) if np.isfinite(s) else None
           for i, s in zip(items_BxK[row], scores_BxK[row])]
    assert got == want, row


@pytest.mark.parametrize('k', [1, 10, 20])
def test_grouped_top_k_is_top_k_ties_and_all(k):
  # 200 distinct values (ties across groups whose best differ), -inf for masked items, a width
  # that leaves the last group short: values and indices as jax.lax.top_k gives them, ties to
  # the lower index.
  rng = np.random.default_rng(k)
  scores = rng.integers(0, 200, (64, 1500)).astype(np.float32)
  scores[rng.random(scores.shape) < 0.3] = -np.inf
  scores[:4, k // 2:] = -np.inf  # rows with fewer than k finite scores
  want = jax.lax.top_k(jnp.asarray(scores), k)
  got = jax.jit(ranking.grouped_top_k, static_argnums=1)(jnp.asarray(scores), k)
  assert -(-len(scores[0]) // ranking.TOP_K_GROUP) >= 4 * k  # the grouped path runs
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
