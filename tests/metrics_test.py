"""Hand-worked checks of the ranking metrics."""

import math

import jax
import numpy as np
import pytest

from pka_jax.evaluation import metrics

jax.config.update('jax_numpy_rank_promotion', 'raise')

# Ranks of five steps at k=10: hits at positions 0, 2 and 9; -1 and 10 are misses.
RANKS = np.array([0, 2, -1, 9, 10])
# HR   = [1, 1, 0, 1, 0]                               -> mean 3/5
# NDCG = [1/log2(2), 1/log2(4), 0, 1/log2(11), 0]     = [1, 1/2, 0, 0.28906..., 0]
# MRR  = [1/1, 1/3, 0, 1/10, 0]
HR = [1.0, 1.0, 0.0, 1.0, 0.0]
NDCG = [1.0, 0.5, 0.0, 1.0 / math.log2(11), 0.0]
MRR = [1.0, 1.0 / 3, 0.0, 0.1, 0.0]


def _accumulator(ranks, top_items, num_items=20, k=10):
  accumulator = metrics.RankingAccumulator(k=k, num_items=num_items)
  accumulator.add(np.asarray(ranks), np.asarray(top_items))
  return accumulator


def test_rank_metrics_hand_worked():
  values = metrics.rank_metrics(RANKS, k=10)
  np.testing.assert_allclose(values['hr'], HR)
  np.testing.assert_allclose(values['ndcg'], NDCG)
  np.testing.assert_allclose(values['mrr'], MRR)


def test_summary_means_and_standard_errors():
  summary = _accumulator(RANKS, np.ones((5, 10), np.int32)).summarize()
  assert summary['num_steps'] == 5
  assert summary['hr@10'] == pytest.approx(0.6)
  assert summary['ndcg@10'] == pytest.approx((1.0 + 0.5 + 1.0 / math.log2(11)) / 5)
  assert summary['mrr@10'] == pytest.approx((1.0 + 1.0 / 3 + 0.1) / 5)
  # HR: mean 0.6, squared deviations 3 * 0.16 + 2 * 0.36 = 1.2, sample variance 1.2 / 4 = 0.3,
  # standard error sqrt(0.3 / 5) = sqrt(0.06).
  assert summary['hr@10_se'] == pytest.approx(math.sqrt(0.06))
  # MRR: deviations from the mean, the same formula written out.
  mean = sum(MRR) / 5
  variance = sum((x - mean) ** 2 for x in MRR) / 4
  assert summary['mrr@10_se'] == pytest.approx(math.sqrt(variance / 5))
  assert summary['ndcg@10_se'] == pytest.approx(np.std(NDCG, ddof=1) / math.sqrt(5))


def test_key_names_follow_k():
  summary = _accumulator([0, 3], np.ones((2, 3), np.int32), k=3).summarize()
  assert set(summary) == {
      'hr@3', 'ndcg@3', 'mrr@3', 'hr@3_se', 'ndcg@3_se', 'mrr@3_se', 'cov@3', 'num_steps'}
  assert summary['hr@3'] == pytest.approx(0.5)  # rank 3 is outside the top 3


def test_standard_error_is_zero_below_two_steps():
  assert _accumulator([1], [[4, 2]]).summarize()['hr@10_se'] == 0.0
  empty = metrics.RankingAccumulator(k=10, num_items=5).summarize()
  assert empty['num_steps'] == 0 and empty['hr@10'] == 0.0 and empty['hr@10_se'] == 0.0


def test_coverage_hand_example():
  # Catalog of 8 items; lists (k=3) cover items {1, 2, 3, 5, 7}; 0 (an empty slot) is ignored.
  top_items = [[1, 2, 3], [2, 5, 0], [7, 1, 2]]
  summary = _accumulator([0, -1, 2], top_items, num_items=8, k=3).summarize()
  assert summary['cov@3'] == pytest.approx(5 / 8)


def test_invalid_rows_are_ignored():
  accumulator = metrics.RankingAccumulator(k=3, num_items=8)
  accumulator.add(np.array([0, 1]), np.array([[1, 2, 3], [4, 5, 6]]), np.array([True, False]))
  summary = accumulator.summarize()
  assert summary['num_steps'] == 1
  assert summary['mrr@3'] == pytest.approx(1.0)
  assert summary['cov@3'] == pytest.approx(3 / 8)


def test_merging_two_accumulators_equals_one():
  rng = np.random.default_rng(0)
  ranks = rng.integers(-1, 12, size=50)
  top_items = rng.integers(1, 40, size=(50, 10))
  whole = _accumulator(ranks, top_items, num_items=40).summarize()
  merged = _accumulator(ranks[:17], top_items[:17], num_items=40).merge(
      _accumulator(ranks[17:], top_items[17:], num_items=40)).summarize()
  assert merged.keys() == whole.keys()
  for key, value in whole.items():
    assert merged[key] == pytest.approx(value), key


def test_merge_rejects_different_k():
  with pytest.raises(ValueError, match='Cannot merge'):
    metrics.RankingAccumulator(k=10, num_items=5).merge(
        metrics.RankingAccumulator(k=5, num_items=5))
