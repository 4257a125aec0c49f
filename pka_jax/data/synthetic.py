"""The embedded dataset: interactions whose next item depends on where earlier items stand.

Every user's history is generated step by step. At step `t` the next item is, with
probability `1 - noise`, `σ_k(x[t - k])`: the item seen `k` steps back mapped by a fixed random
permutation `σ_k` of the catalog that belongs to that distance, where the lag `k` is drawn at
each step from `LAGS` (several distances, none of them 1, so the most recent item alone does
not reveal the answer). With probability `noise` it is a draw from a Zipf popularity law.
Items never repeat within a user's history (so every held-out target is a legal
recommendation under seen-item masking): when `σ_k(x[t - k])` was seen already, the other
lags are tried in random order, and when all were seen, a popular unseen item is drawn. The
first `max(LAGS)` items are popularity draws.

A model must know which item stands 2, 3 or 5 positions back, and so which map applies to
it, to fit the rule. A model that sees the history as a set (no positional information
beyond the causal mask) cannot pair items with their distance: one map per distance keeps
it from narrowing the candidates to the images of the history under a single map.

Each user is active over a random window of a shared time line (exponential gaps), so the
global temporal split leaves the tail of many users' histories for validation and test.
"""

from __future__ import annotations

import numpy as np

from pka_jax.data.interactions import Interactions

LAGS = (2, 3, 5)


def rule_permutations(num_items: int, seed: int) -> np.ndarray:
  """The maps `σ_k` of the rule, one row per lag of `LAGS` (item codes `0..num_items-1`)."""
  rng = np.random.default_rng([seed, 0])
  return np.stack([rng.permutation(num_items) for _ in LAGS])


def _popular_unseen(rng: np.random.Generator, cdf: np.ndarray, seen: set[int]) -> int:
  while True:
    item = int(np.searchsorted(cdf, rng.random()))
    if item not in seen:
      return item


def _history(rng, length, permutations, cdf, noise) -> list[int]:
  history: list[int] = []
  seen: set[int] = set()
  for t in range(length):
    candidates = []
    if t >= max(LAGS) and rng.random() >= noise:
      candidates = [int(permutations[j, history[t - LAGS[j]]])
                    for j in rng.permutation(len(LAGS))]
    item = next((c for c in candidates if c not in seen), None)
    if item is None:
      item = _popular_unseen(rng, cdf, seen)
    history.append(item)
    seen.add(item)
  return history


def generate(
    *,
    num_users: int,
    num_items: int,
    min_length: int,
    max_length: int,
    noise: float,
    seed: int,
) -> Interactions:
  """Generates the interactions; identical arguments give identical data."""
  if max_length >= num_items:
    raise ValueError(f'synthetic: max_length {max_length} must be below num_items {num_items}')
  permutations = rule_permutations(num_items, seed)
  rng = np.random.default_rng([seed, 1])
  popularity = 1.0 / np.arange(1, num_items + 1)
  cdf = np.cumsum(rng.permutation(popularity))
  cdf /= cdf[-1]
  users, items, times = [], [], []
  horizon = 1_000_000
  for user in range(num_users):
    length = int(rng.integers(min_length, max_length + 1))
    gaps = rng.exponential(horizon / (4 * max_length), size=length).astype(np.int64) + 1
    start = int(rng.integers(0, horizon))
    users.append(np.full(length, user))
    items.append(_history(rng, length, permutations, cdf, noise))
    times.append(start + np.cumsum(gaps))
  return Interactions.from_raw(
      np.concatenate(users), np.concatenate(items), np.concatenate(times))
