"""The embedded dataset follows its documented rule."""

import numpy as np

from pka_jax.data import synthetic

SETTINGS = dict(num_users=300, num_items=200, min_length=15, max_length=30, noise=0.1, seed=0)


def histories(data):
  order = np.lexsort((data.timestamp, data.user))
  items = data.item_ids[data.item[order]]
  return np.split(items, np.flatnonzero(np.diff(data.user[order])) + 1)


def test_same_seed_same_data_other_seed_other_data():
  a, b = synthetic.generate(**SETTINGS), synthetic.generate(**SETTINGS)
  c = synthetic.generate(**{**SETTINGS, 'seed': 1})
  np.testing.assert_array_equal(a.item_ids[a.item], b.item_ids[b.item])
  assert len(a) != len(c) or not np.array_equal(a.item_ids[a.item], c.item_ids[c.item])


def test_histories_follow_the_lag_rule_without_repeats():
  data = synthetic.generate(**SETTINGS)
  seqs = histories(data)
  assert all(len(s) == len(set(s.tolist())) for s in seqs)
  assert all(SETTINGS['min_length'] <= len(s) <= SETTINGS['max_length'] for s in seqs)
  sigma = synthetic.rule_permutations(SETTINGS['num_items'], SETTINGS['seed'])
  start = max(synthetic.LAGS)
  steps = [(s, t) for s in seqs for t in range(start, len(s))]
  explained = sum(any(sigma[j, s[t - k]] == s[t] for j, k in enumerate(synthetic.LAGS))
                  for s, t in steps)
  # 1 - noise of the steps follow the rule (less the repeats it had to redraw).
  assert explained / len(steps) > 0.75
  # The rule needs the lags: the item right before explains almost nothing.
  assert sum(sigma[0, s[t - 1]] == s[t] for s, t in steps) / len(steps) < 0.05
