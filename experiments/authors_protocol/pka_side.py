"""pka_jax's successive protocol on the data `compare.py` generated, with the same ranker.

  python -m experiments.authors_protocol.pka_side --out=<dir>

reads `<dir>/synthetic_collision.csv` (`userid,itemid,timestamp`), splits it with
`pka_jax.data.split.temporal_split` and ranks every step by training popularity (ties by raw
item id, the order `compare.py` uses) through `pka_jax.evaluation.protocol.evaluate`. With
`<dir>/compare.json` from `compare.py`, it prints the three protocols side by side (pka_jax,
the correct protocol written out in `compare.py`, the authors' `evaluate`) and fails when
pka_jax's numbers differ from the correct protocol's.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax.numpy as jnp
import numpy as np

from pka_jax.data.interactions import Interactions
from pka_jax.data.split import temporal_split
from pka_jax.evaluation import protocol

_OUT = flags.DEFINE_string('out', None, 'The folder compare.py wrote to.', required=True)

DATA_FILE = 'synthetic_collision.csv'
METRICS = (('HR@10', 'hr@10'), ('NDCG@10', 'ndcg@10'), ('MRR@10', 'mrr@10'))


def training_popularity_scores(dataset) -> np.ndarray:
  """Score per dense item (column 0 padding, lowest): most trained-on first, ties by raw id."""
  counts = np.bincount(dataset.train.items, minlength=dataset.num_items + 1)[1:]
  order = np.lexsort((dataset.item_ids, -counts))  # dense item order + 1, best first
  scores = np.full(dataset.num_items + 1, -1e9, dtype=np.float32)
  scores[order + 1] = dataset.num_items - np.arange(dataset.num_items)
  return scores


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  columns = np.loadtxt(os.path.join(_OUT.value, DATA_FILE), delimiter=',', skiprows=1,
                       dtype=np.int64, ndmin=2)
  dataset = temporal_split(Interactions.from_raw(columns[:, 0], columns[:, 1], columns[:, 2]))
  scores_V = jnp.asarray(training_popularity_scores(dataset))

  def score_fn(inputs_BxT):
    return jnp.broadcast_to(scores_V, (inputs_BxT.shape[0], scores_V.shape[0]))

  pka = {}
  for part in ('valid', 'test'):
    summary = protocol.evaluate(score_fn, dataset, part, maxlen=200, batch_size=64, top_k=10)
    pka[part] = {'num_steps': int(summary['num_steps']),
                 **{name: float(summary[key]) for name, key in METRICS}}
  print(f'pka_jax split (train/valid/test interactions): {dataset.info["num_train"]}, '
        f'{dataset.info["num_valid"]}, {dataset.info["num_test"]}')

  compared_path = os.path.join(_OUT.value, 'compare.json')
  compared = None
  if os.path.exists(compared_path):
    with open(compared_path) as f:
      compared = json.load(f)
    ranking = np.asarray(dataset.item_ids)[np.argsort(-training_popularity_scores(dataset)[1:])]
    assert ranking.tolist() == compared['popularity_order'], 'not the same ranker'

  print('\nTraining-popularity ranker, successive protocol, top 10:')
  print(f'{"part":6} {"protocol":22} {"steps":>6} {"HR@10":>8} {"NDCG@10":>8} {"MRR@10":>8}')
  rows = [('pka_jax', 'pka_jax', pka)]
  if compared:
    results = compared['results']
    rows += [('reference', 'correct (compare.py)', {p: results[p]['reference'] for p in results}),
             ('authors', 'their evaluate', {p: results[p]['authors'] for p in results})]
  for part in ('valid', 'test'):
    for _, label, by_part in rows:
      m = by_part[part]
      print(f'{part:6} {label:22} {m["num_steps"]:6d} {m["HR@10"]:8.4f} {m["NDCG@10"]:8.4f} '
            f'{m["MRR@10"]:8.4f}')
  if compared:
    for part in ('valid', 'test'):
      reference = compared['results'][part]['reference']
      assert pka[part]['num_steps'] == reference['num_steps'], part
      for name, _ in METRICS:
        assert abs(pka[part][name] - reference[name]) < 1e-9, (part, name)
    print('pka_jax equals the correct protocol on both parts.')


if __name__ == '__main__':
  app.run(main)
