"""Ranking metrics at k (HR, NDCG, MRR, COV), accumulated on the host as sums and counts.

A step's rank is the 0-based position of its target in the top-k list; any rank outside
`[0, k)` (the evaluator uses -1) means the target is not in the list. Accumulators hold sums,
sums of squares, a count and the set of recommended items, so batches and hosts merge exactly.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

METRICS = ('hr', 'ndcg', 'mrr')


def rank_metrics(ranks_B: np.ndarray, k: int) -> dict[str, np.ndarray]:
  """Per-step HR, NDCG and MRR at k (float64 arrays shaped like `ranks_B`)."""
  ranks_B = np.asarray(ranks_B)
  hit_B = (ranks_B >= 0) & (ranks_B < k)
  position_B = np.where(hit_B, ranks_B, 0).astype(np.float64) + 1.0
  return {
      'hr': hit_B.astype(np.float64),
      'ndcg': np.where(hit_B, 1.0 / np.log2(position_B + 1.0), 0.0),
      'mrr': np.where(hit_B, 1.0 / position_B, 0.0),
  }


def _zeros() -> dict[str, float]:
  return {name: 0.0 for name in METRICS}


@dataclasses.dataclass
class RankingAccumulator:
  """Running sums of the per-step metrics at `k` over a catalog of `num_items` items (1..N)."""

  k: int
  num_items: int
  count: int = 0
  sums: dict[str, float] = dataclasses.field(default_factory=_zeros)
  sq_sums: dict[str, float] = dataclasses.field(default_factory=_zeros)
  # recommended[i]: item i appeared in some top-k list; index 0 (padding) is never counted.
  recommended: np.ndarray | None = None

  def __post_init__(self):
    if self.recommended is None:
      self.recommended = np.zeros(self.num_items + 1, dtype=bool)

  def add(
      self,
      ranks_B: np.ndarray,
      top_items_BxK: np.ndarray,
      valid_B: np.ndarray | None = None,
  ) -> None:
    """Adds a batch of steps; rows with `valid_B` False (batch padding) are ignored."""
    ranks_B = np.asarray(ranks_B)
    top_items_BxK = np.asarray(top_items_BxK)
    if valid_B is not None:
      ranks_B = ranks_B[valid_B]
      top_items_BxK = top_items_BxK[valid_B]
    for name, values_B in rank_metrics(ranks_B, self.k).items():
      self.sums[name] += float(values_B.sum())
      self.sq_sums[name] += float(np.square(values_B).sum())
    self.count += len(ranks_B)
    self.recommended[top_items_BxK.ravel()] = True

  def merge(self, other: RankingAccumulator) -> RankingAccumulator:
    """The accumulator of both sets of steps (e.g. two batches or two hosts)."""
    if (self.k, self.num_items) != (other.k, other.num_items):
      raise ValueError(
          f'Cannot merge accumulators at k={self.k}, N={self.num_items} and '
          f'k={other.k}, N={other.num_items}')
    return RankingAccumulator(
        k=self.k,
        num_items=self.num_items,
        count=self.count + other.count,
        sums={name: self.sums[name] + other.sums[name] for name in METRICS},
        sq_sums={name: self.sq_sums[name] + other.sq_sums[name] for name in METRICS},
        recommended=self.recommended | other.recommended)

  def summarize(self) -> dict[str, float]:
    """Means with their standard errors (ddof=1), coverage and the step count.

    With no steps the means are 0; the standard error is 0 below two steps.
    """
    n = self.count
    summary = {}
    for name in METRICS:
      mean = self.sums[name] / n if n else 0.0
      se = 0.0
      if n >= 2:
        variance = max(self.sq_sums[name] - n * mean * mean, 0.0) / (n - 1)
        se = math.sqrt(variance / n)
      summary[f'{name}@{self.k}'] = mean
      summary[f'{name}@{self.k}_se'] = se
    covered = int(self.recommended[1:].sum())
    summary[f'cov@{self.k}'] = covered / self.num_items if self.num_items else 0.0
    summary['num_steps'] = n
    return summary
