"""Top-k recommendations from a trained model: raw item ids in, raw item ids and scores out.

Histories are scored by the evaluation's model call (`Encoder.encode_last` on the last
`maxlen` items), the history's items are masked as in evaluation, and the top k are taken
(`ranking.top_k_scores`), in batches of a few fixed shapes (BATCH_SHAPES), each compiled once.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from pka_jax import sharding
from pka_jax.data.sequences import power_of_two_at_least, window_width
from pka_jax.evaluation import ranking
from pka_jax.model.encoder import create_model
from pka_jax.serving.files import ServingData, serving_data
from pka_jax.training import checkpoint


# Histories are scored in batches of these sizes (the smallest that holds the rest of the input),
# so one history costs a batch of 1, not of 512.
BATCH_SHAPES = (1, 8, 64, ranking.RECOMMEND_ROWS)


_UNKNOWN_NAMED = 20  # unknown ids named in the warning; the rest are counted


def left_padded(histories: Sequence[np.ndarray], rows: int, width: int) -> np.ndarray:
  """The last `width` items of each history, right-aligned in `rows × width` zeros."""
  out = np.zeros((rows, width), np.int32)
  for row, history in enumerate(histories):
    recent = history[len(history) - width:] if len(history) > width else history
    out[row, width - len(recent):] = recent
  return out


def _batch_shape(rows: int) -> int:
  return next(b for b in BATCH_SHAPES if b >= rows)


class Recommendations(NamedTuple):
  """Best first. For one history: `items` and `scores` of shape K; for many: B×K."""

  items: np.ndarray  # raw item ids
  scores: np.ndarray  # float32: the model's scores (for empty histories, popularity shares)
  popular: np.ndarray  # bool, per history: no known item in it, so popularity ranked it


class TooFewItemsError(ValueError):
  """`k` exceeds the items left for a history; `row` is its index in the call."""

  def __init__(self, message: str, row: int):
    super().__init__(message)
    self.row = row


class Recommender:
  """A trained model and its serving data: top-k recommendations in raw ids."""

  def __init__(self, *, config: ml_collections.ConfigDict, params, served: ServingData,
               step: int, mesh: jax.sharding.Mesh | None = None):
    self.config, self.params, self.served, self.step = config, params, served, step
    self.model = create_model(config, served.num_items, deterministic=True, mesh=mesh)
    self.maxlen: int = config.maxlen
    counts = np.asarray(served.item_counts, np.float64)
    popularity_V = np.concatenate([[0.0], counts / counts.sum()]).astype(np.float32)
    self.popularity_V = jnp.asarray(popularity_V)
    self._all_allowed_V = jnp.asarray(np.arange(served.num_items + 1) > 0)
    self._top_k = jax.jit(functools.partial(ranking.top_k_scores, self.model),
                          static_argnames='k')

  @classmethod
  def from_workdir(cls, workdir: str, step: int | str = 'best', *,
                   data_dir: str | None = None, devices: Sequence | None = None
                   ) -> Recommender:
    """The parameters of checkpoint `step` ('best', 'latest' or a number) of `workdir`.

    Reads only the workdir (`data_dir` serves workdirs trained before the serving files, once).
    A run whose item table was split over `config.mesh_model` devices is split again over as
    many of `devices` (this host's by default), when there are enough; else it runs on one.
    """
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f'No workdir at {workdir}')
    with checkpoint.orbax_errors_only():
      config = checkpoint.restore_config(workdir)
      served = serving_data(workdir, config, data_dir)
      devices = list(jax.local_devices() if devices is None else devices)
      shards = config.get('mesh_model', 1)
      mesh = sharding.make_mesh(shards, devices[:shards]) if 1 < shards <= len(devices) else None
      number, params = checkpoint.restore_params(
          workdir, checkpoint.params_target(config, served.num_items, mesh), step)
    return cls(config=config, params=params, served=served, step=number, mesh=mesh)

  @property
  def item_ids(self) -> np.ndarray:
    return self.served.item_ids

  @property
  def user_ids(self) -> np.ndarray:
    return self.served.user_ids

  @functools.cached_property
  def _dense_item(self) -> dict:
    return {raw: dense for dense, raw in enumerate(self.item_ids.tolist(), 1)}

  @functools.cached_property
  def _dense_user(self) -> dict:
    return {raw: dense for dense, raw in enumerate(self.user_ids.tolist())}

  def user_history(self, raw_user) -> list:
    """Every item of a known user (train, then validation, then test), as raw ids."""
    dense = self._dense_user.get(raw_user)
    if dense is None:
      raise KeyError(f'user {raw_user!r} is not a user of dataset {self.config.dataset!r}')
    return self.item_ids[np.asarray(self.served.histories[dense]) - 1].tolist()

  def dense_items(self, raw_items: Iterable) -> tuple[np.ndarray, list]:
    """`(dense ids of the known items, in order; the unknown raw ids)`."""
    dense, unknown = [], []
    for raw in raw_items:
      item = self._dense_item.get(raw)
      if item is None:
        unknown.append(raw)
      else:
        dense.append(item)
    return np.array(dense, np.int32), unknown

  def recommend(self, histories: Sequence, k: int = 10, *, exclude_seen: bool = True,
                candidates: Iterable | None = None) -> Recommendations:
    """The k best items after each history (raw ids, oldest first), from `candidates` only if
    given, never an item of the history itself with `exclude_seen`.

    `histories` is one history (a sequence of raw ids, possibly empty) or a sequence of them.
    Unknown ids are skipped with one warning; a history left empty gets the most popular
    training items. Raises TooFewItemsError when fewer than `k` items are left for a history.
    """
    single = _is_single_history(histories)
    rows = [histories] if single else list(histories)
    dense_rows, unknown = [], []
    for history in rows:
      dense, missing = self.dense_items(history)
      dense_rows.append(dense)
      unknown += missing
    allowed_V = None
    if candidates is not None:
      allowed_V, missing = self.candidate_mask(candidates)
      warn_unknown(missing, 'candidate')
    warn_unknown(unknown, 'history')
    top = self.recommend_dense(dense_rows, k, exclude_seen=exclude_seen, allowed_V=allowed_V)
    return Recommendations(*(a[0] for a in top)) if single else top

  def candidate_mask(self, candidates: Iterable) -> tuple[np.ndarray, list]:
    """`(bool mask over dense ids 0..N, the unknown raw ids)`."""
    dense, unknown = self.dense_items(candidates)
    allowed_V = np.zeros(self.served.num_items + 1, bool)
    allowed_V[dense] = True
    return allowed_V, unknown

  def recommend_dense(self, histories: Sequence[np.ndarray], k: int, *,
                      exclude_seen: bool = True, allowed_V: np.ndarray | None = None,
                      progress: bool = False) -> Recommendations:
    """`recommend` on dense-id histories (no unknown ids), returning raw ids."""
    self.check_k(histories, k, exclude_seen=exclude_seen, allowed_V=allowed_V)
    allowed = self._all_allowed_V if allowed_V is None else jnp.asarray(allowed_V)
    chunk = BATCH_SHAPES[-1]
    starts = range(0, len(histories), chunk)
    show = progress and len(starts) > 1
    # Dispatched without waiting, read at the end: batch i + 1 is built while i is scored.
    outputs = [self._score_rows(histories[start:start + chunk], k, exclude_seen, allowed)
               for start in tqdm.tqdm(starts, desc='recommend', disable=None if show else True)]
    items_BxK = np.zeros((0, k), np.int32)
    scores_BxK = np.zeros((0, k), np.float32)
    if outputs:  # each batch's padding rows are dropped after reading
      rows = [min(chunk, len(histories) - start) for start in starts]
      items, scores = zip(*jax.device_get(outputs))
      items_BxK = np.concatenate([a[:n] for a, n in zip(items, rows)])
      scores_BxK = np.concatenate([a[:n] for a, n in zip(scores, rows)])
    popular_B = np.array([len(h) == 0 for h in histories], bool)
    return Recommendations(self.item_ids[items_BxK - 1], scores_BxK, popular_B)

  def _score_rows(self, rows: Sequence[np.ndarray], k: int, exclude_seen: bool,
                  allowed_V: jax.Array) -> tuple[jax.Array, jax.Array]:
    batch = _batch_shape(len(rows))
    inputs_BxT = left_padded(rows, batch, self.window_for(max(len(r) for r in rows)))
    if exclude_seen:
      width = power_of_two_at_least(max([self.maxlen] + [len(r) for r in rows]))
      seen_BxS = np.zeros((batch, width), np.int32)
      for row, history in enumerate(rows):
        seen_BxS[row, :len(history)] = history
    else:
      seen_BxS = np.zeros((batch, 1), np.int32)
    return self._top_k(self.params, inputs_BxT, seen_BxS, allowed_V, self.popularity_V, k=k)

  def window_for(self, longest: int) -> int:
    """The window a batch whose longest history holds `longest` items is scored in: as in
    evaluation (Placement.evaluation_windows), no wider than that history needs (a few
    shapes), where trimming is exact; with visible padding keys that are all alike, one
    padding column wider (encoder.Encoder)."""
    windows = self.model.config.evaluation_windows(self.config.get('trim_windows', True))
    if not windows['trim']:
      return self.maxlen
    return window_width(longest + int(windows['padding_column']), self.maxlen)

  def check_k(self, histories: Sequence[np.ndarray], k: int, *, exclude_seen: bool = True,
              allowed_V: np.ndarray | None = None) -> None:
    """Raises TooFewItemsError naming the first history that leaves fewer than `k` items."""
    if k < 1:
      raise ValueError(f'k must be at least 1, got {k}')
    num_items = self.served.num_items
    pool = num_items if allowed_V is None else int(np.count_nonzero(allowed_V))
    if k <= pool - max([len(h) for h in histories if exclude_seen], default=0):
      return
    pool_name = (f'the {num_items} catalog items' if allowed_V is None
                 else f'the {pool} known candidates')
    for row, history in enumerate(histories):
      seen = np.unique(history) if exclude_seen else np.zeros(0, np.int32)
      if allowed_V is not None:
        seen = seen[allowed_V[seen]]
      if k > pool - len(seen):
        raise TooFewItemsError(
            f'k={k} but only {pool - len(seen)} items are left for history {row}: '
            f'{pool_name} less the {len(seen)} of them in the history', row)


def _is_single_history(histories) -> bool:
  if isinstance(histories, np.ndarray):
    return histories.ndim == 1
  return len(histories) == 0 or not isinstance(histories[0], (list, tuple, np.ndarray))


def warn_unknown(unknown: list, what: str) -> None:
  """One warning naming the unknown ids (the first _UNKNOWN_NAMED of them, then a count)."""
  if not unknown:
    return
  distinct = list(dict.fromkeys(unknown))
  named = ', '.join(map(repr, distinct[:_UNKNOWN_NAMED]))
  more = (f' and {len(distinct) - _UNKNOWN_NAMED} more' if len(distinct) > _UNKNOWN_NAMED
          else '')
  logging.warning('Skipped %d %s item id(s) not in the training catalog: %s%s', len(distinct),
                  what, named, more)
