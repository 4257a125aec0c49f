"""The trained scorer as a `jax.export` artefact: serving needs jax and numpy, not this package.

Writes, into OUT (under a temporary name renamed into place when complete):

  scorer.jax      `jax.export` serialization of `score(history_BxT int32) -> (items_BxK int32,
                  scores_BxK float32)`: dense item ids, each history the last T = maxlen items
                  left-padded with 0, any batch size B. The history's own items are excluded;
                  a history of padding only gets the most popular training items (scores: their
                  share of training interactions). Same scores and top-k as `pka_jax.recommend`.
                  A row with fewer than k items left ends in item 0 with score -inf.
  item_ids.npy    the raw id of dense item i at index i - 1
  meta.json       maxlen, k, num_items, the checkpoint step and the platforms

Load and call it (docs/serving.md):

  scorer = jax.export.deserialize(open('OUT/scorer.jax', 'rb').read())
  items_BxK, scores_BxK = scorer.call(history_BxT)
"""

from __future__ import annotations

import os

import jax
from jax import export
import jax.numpy as jnp
import numpy as np

from pka_jax import files
from pka_jax.evaluation import ranking
from pka_jax.serving.recommender import Recommender


FILES = ('scorer.jax', 'item_ids.npy', 'meta.json')


def scorer(recommender: Recommender, k: int):
  """`score(history_BxT) -> (items_BxK, scores_BxK)` with the parameters as constants."""
  allowed_V = jnp.arange(recommender.served.num_items + 1) > 0

  def score(history_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    return ranking.top_k_scores(recommender.model, recommender.params, history_BxT,
                                  history_BxT, allowed_V, recommender.popularity_V, k=k)

  return score


def export_scorer(recommender: Recommender, k: int,
                  platforms: tuple[str, ...] = ('cpu',)) -> export.Exported:
  """The scorer lowered for `platforms` with a symbolic batch dimension."""
  if not 1 <= k <= recommender.served.num_items:
    raise ValueError(f'k={k}: expected 1 to the {recommender.served.num_items} catalog items')
  batch, = export.symbolic_shape('b')
  history = jax.ShapeDtypeStruct((batch, recommender.maxlen), jnp.int32)
  return export.export(jax.jit(scorer(recommender, k)), platforms=platforms)(history)


def write_export(recommender: Recommender, out: str, k: int,
                 platforms: tuple[str, ...] = ('cpu',)) -> None:
  """Writes scorer.jax, item_ids.npy and meta.json into `out`, replacing it when complete.

  `out` must be new, empty or an earlier export: it is replaced whole.
  """
  others = set(os.listdir(out)) - set(FILES) if os.path.isdir(out) else set()
  if others or (os.path.exists(out) and not os.path.isdir(out)):
    raise ValueError(f'{out} exists and holds other things than an export '
                     f'({sorted(others)[:5] or "a file"}): give a new or empty directory')
  exported = export_scorer(recommender, k, platforms)
  with files.new_directory(out) as tmp:
    with open(os.path.join(tmp, 'scorer.jax'), 'wb') as f:
      f.write(exported.serialize())
    np.save(os.path.join(tmp, 'item_ids.npy'), np.asarray(recommender.item_ids),
            allow_pickle=False)
    files.write_json(os.path.join(tmp, 'meta.json'), {
        'maxlen': recommender.maxlen, 'k': k, 'num_items': recommender.served.num_items,
        'step': recommender.step, 'platforms': list(exported.platforms),
        'dataset': recommender.config.dataset, 'model': recommender.config.model})
