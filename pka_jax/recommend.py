"""Top-k recommendations from a workdir alone: raw item ids in, raw item ids and scores out.

  python -m pka_jax.recommend --workdir=runs/synthetic --history=12,7,33 --k=10
  python -m pka_jax.recommend --workdir=runs/synthetic --user=42
  python -m pka_jax.recommend --workdir=runs/synthetic --input=histories.csv --output=top10.jsonl

A workdir is self-contained once `WORKDIR/serving/` exists (written at the end of training by
`write_serving_files`, or on first use from the run's dataset): the raw item and user ids, the
items' training popularity and every user's history. The parameters come from the checkpoint
alone, so a moved or copied workdir keeps working from any directory.

Histories are scored by the evaluation's model call (`Encoder.score_last` on the last `maxlen`
items), the history's items are masked as in evaluation, and the top k are taken, in batches of
a few fixed shapes (BATCH_SHAPES), each compiled once.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import tqdm

from pka_jax import checkpoint
from pka_jax import data
from pka_jax import evaluate
from pka_jax import losses
from pka_jax import sharding
from pka_jax.data.errors import DataError
from pka_jax.data.sequences import SequenceStore, SplitDataset, power_of_two_at_least
from pka_jax.models import Encoder, create_model

SERVING_DIR = 'serving'
SERVING_FORMAT_VERSION = 1
# Histories are scored in batches of these sizes (the smallest that holds the rest of the input),
# so one history costs a batch of 1, not of 512.
BATCH_SHAPES = (1, 8, 64, 512)
_UNKNOWN_NAMED = 20  # unknown ids named in the warning; the rest are counted


# ---- the serving files ----


@dataclasses.dataclass(frozen=True)
class ServingData:
  """What recommending needs besides the parameters; dense item `i` is raw `item_ids[i - 1]`."""

  item_ids: np.ndarray  # raw id of dense item i at index i - 1
  user_ids: np.ndarray  # raw id of dense user u at index u
  item_counts: np.ndarray  # int64 [N]: training interactions of dense item i at index i - 1
  histories: SequenceStore  # per dense user: train, then validation, then test items

  @property
  def num_items(self) -> int:
    return len(self.item_ids)

  @classmethod
  def from_dataset(cls, dataset: SplitDataset) -> ServingData:
    counts = np.bincount(np.asarray(dataset.train.items), minlength=dataset.num_items + 1)
    return cls(item_ids=_savable(dataset.item_ids), user_ids=_savable(dataset.user_ids),
               item_counts=counts[1:].astype(np.int64), histories=full_histories(dataset))

  def save(self, workdir: str) -> None:
    """Writes `WORKDIR/serving/` under a temporary name, then renames it into place."""
    directory = os.path.join(workdir, SERVING_DIR)
    tmp = temporary_directory_beside(directory)
    try:
      arrays = {'item_ids': self.item_ids, 'user_ids': self.user_ids,
                'item_counts': self.item_counts, 'history_offsets': self.histories.offsets,
                'history_items': self.histories.items}
      for name, array in arrays.items():
        np.save(os.path.join(tmp, name + '.npy'), np.asarray(array), allow_pickle=False)
      meta = {'format_version': SERVING_FORMAT_VERSION, 'num_items': self.num_items,
              'num_users': len(self.user_ids)}
      with open(os.path.join(tmp, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=2, sort_keys=True)
      replace_directory(tmp, directory)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise

  @classmethod
  def load(cls, workdir: str) -> ServingData | None:
    """The workdir's serving files (memory-mapped), or None when it has none."""
    directory = os.path.join(workdir, SERVING_DIR)
    if not os.path.exists(os.path.join(directory, 'meta.json')):
      return None

    def load(name):
      return np.load(os.path.join(directory, name + '.npy'), mmap_mode='r', allow_pickle=False)

    return cls(item_ids=load('item_ids'), user_ids=load('user_ids'),
               item_counts=load('item_counts'),
               histories=SequenceStore(offsets=load('history_offsets'),
                                       items=load('history_items')))


def _savable(ids: np.ndarray) -> np.ndarray:
  """Object arrays (pyarrow strings) become fixed-width unicode so they save without pickle."""
  ids = np.array(ids)  # a copy: the dataset's arrays may map files about to be removed
  return ids.astype(str) if ids.dtype == object else ids


def temporary_directory_beside(directory: str) -> str:
  """An empty directory in `directory`'s parent, with the permissions `mkdir` would give."""
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.tmp-{os.path.basename(os.path.abspath(directory))}-',
                         dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the files from other users
  return tmp


def replace_directory(tmp: str, directory: str) -> None:
  if os.path.exists(directory):
    old = tmp + '.old'
    os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old)
  else:
    os.rename(tmp, directory)


def full_histories(dataset: SplitDataset) -> SequenceStore:
  """Every user's items in time order: train, then the user's validation and test events."""
  lengths = dataset.train.lengths()
  users = np.concatenate([np.repeat(np.arange(len(lengths)), lengths),
                          dataset.valid.user, dataset.test.user])
  items = np.concatenate([dataset.train.items, dataset.valid.item, dataset.test.item])
  order = np.argsort(users, kind='stable')  # each user's train items, then events in time order
  return SequenceStore.from_sorted(users[order], items[order], len(lengths))


def write_serving_files(workdir: str, dataset: SplitDataset) -> None:
  """Makes `workdir` self-contained for recommending (process 0 writes, the others return)."""
  if jax.process_index() == 0:
    ServingData.from_dataset(dataset).save(workdir)


def serving_data(workdir: str, config: ml_collections.ConfigDict,
                 data_dir: str | None = None) -> ServingData:
  """The workdir's serving files; for a workdir trained before they existed, builds them from
  the run's dataset (under `data_dir`, default the saved config's) and writes them."""
  served = ServingData.load(workdir)
  if served is not None:
    return served
  logging.info('%s has no serving files: building them from dataset %r', workdir, config.dataset)
  served = _served_from_run_dataset(workdir, config, data_dir)
  try:
    served.save(workdir)
  except OSError as error:  # a read-only workdir still serves, from memory
    logging.warning('Could not write serving files to %s: %s', workdir, error)
  return served


def _served_from_run_dataset(workdir: str, config: ml_collections.ConfigDict,
                             data_dir: str | None) -> ServingData:
  config = ml_collections.ConfigDict(config.to_dict())
  if data_dir is None and config.dataset == 'synthetic':
    # Regenerated from its seed, in a scratch directory rather than the caller's directory.
    with tempfile.TemporaryDirectory() as scratch:
      config.data_dir = scratch
      return ServingData.from_dataset(data.load_dataset(config))
  config.data_dir = data_dir or config.data_dir
  try:
    return ServingData.from_dataset(data.load_dataset(config))
  except DataError as error:
    raise DataError(
        f'{workdir} has no serving files and its dataset could not be loaded from data_dir '
        f'{os.path.abspath(config.data_dir)!r} ({error}); run once from the directory training '
        'ran in, or give --data_dir') from None


# ---- scoring ----


def top_k_scores(model: Encoder, params, inputs_BxT: jax.Array, seen_BxS: jax.Array,
                 allowed_V: jax.Array, popularity_V: jax.Array, *, k: int,
                 ) -> tuple[jax.Array, jax.Array]:
  """The k best items after each history and their scores: `(items_BxK int32, scores_BxK)`.

  Rows whose input is all padding are scored by `popularity_V`; then padding, the `seen_BxS`
  items (dense ids, 0-padded) and items outside `allowed_V` are masked. Slots left without an
  item hold item 0 and score -inf. The catalog is scored in blocks (evaluate.block_top_k):
  no `B × N` scores exist at once, however large the catalog. When the model's mesh splits
  the item table over 'model', each shard ranks its rows and their lists are merged.
  """
  hidden_BxD = model.apply({'params': params}, inputs_BxT, method=Encoder.encode_last)
  empty_Bx1 = ~jnp.any(inputs_BxT != 0, axis=1, keepdims=True)
  rows_B = jnp.arange(seen_BxS.shape[0], dtype=jnp.int32)
  seen = jnp.repeat(rows_B, seen_BxS.shape[1]), seen_BxS.reshape(-1)
  table_RxD = params['item_emb']['embedding']
  mesh = model.mesh
  if mesh is None or mesh.shape[sharding.MODEL] == 1:
    return _top_k_of_rows(hidden_BxD, table_RxD, *seen, empty_Bx1, allowed_V, popularity_V,
                          first=0, k=k)

  def per_shard(hidden, table, rows_P, items_P, empty, allowed, popularity):
    items, scores = _top_k_of_rows(hidden, table, rows_P, items_P, empty, allowed, popularity,
                                   first=sharding.shard_range(table.shape[0]), k=k)
    scores, items = evaluate.merge_shard_lists(scores, items, k)
    return jnp.where(scores > -jnp.inf, items, 0), scores

  replicated = P()
  return jax.shard_map(
      per_shard, mesh=mesh, in_specs=(replicated, P(sharding.MODEL)) + (replicated,) * 5,
      out_specs=(replicated, replicated))(
          hidden_BxD, table_RxD, *seen, empty_Bx1, allowed_V, popularity_V)


def _top_k_of_rows(hidden_BxD, table_RxD, seen_rows_P, seen_items_P, empty_Bx1, allowed_V,
                   popularity_V, *, first, k: int) -> tuple[jax.Array, jax.Array]:
  """`(items_BxK, scores_BxK)` of table rows `[first, first + R)` (evaluate.block_top_k)."""
  last_V = allowed_V.shape[0] - 1

  def adjust(scores_BxK, item_K):
    item_K = jnp.minimum(item_K, last_V)  # rows past the catalog are masked after this
    scores_BxK = jnp.where(empty_Bx1, popularity_V[item_K][None].astype(jnp.float32),
                           scores_BxK)
    return jnp.where(allowed_V[item_K][None], scores_BxK, -jnp.inf)

  top_scores_BxK, top_items_BxK = evaluate.block_top_k(
      hidden_BxD, table_RxD, seen_rows_P, seen_items_P, first=first, num_items=last_V,
      top_k=k, adjust=adjust,
      block_size=losses.chunk_rows_for(BATCH_SHAPES[-1], table_RxD.shape[0]))  # any batch
  return jnp.where(top_scores_BxK > -jnp.inf, top_items_BxK, 0), top_scores_BxK


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
    self._top_k = jax.jit(functools.partial(top_k_scores, self.model), static_argnames='k')

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
      number, params = restore_params(workdir, config, served.num_items, step, mesh=mesh)
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
    evaluation (train.Run.evaluation_windows), no wider than that history needs (a few
    shapes), where trimming is exact; with visible padding keys that are all alike, one
    padding column wider (models.Encoder)."""
    windows = self.model.config.evaluation_windows(self.config.get('trim_windows', True))
    if not windows['trim']:
      return self.maxlen
    return evaluate.window_width(longest + int(windows['padding_column']), self.maxlen)

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


def restore_params(workdir: str, config: ml_collections.ConfigDict, num_items: int,
                   step: int | str = 'best', mesh: jax.sharding.Mesh | None = None
                   ) -> tuple[int, dict]:
  """`(step number, parameters)` of a checkpoint (checkpoint.restore_params): on one device,
  or with the item table's rows split over `mesh`'s 'model' axis."""
  model = create_model(config, num_items, deterministic=True)
  inputs_1xT = jnp.zeros((1, config.maxlen), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs_1xT)['params'])
  placements = (jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
                             shapes) if mesh is None else sharding.state_shardings(shapes, mesh))
  target = jax.tree.map(lambda a, placement: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                  sharding=placement),
                        shapes, placements)
  return checkpoint.restore_params(workdir, target, step)


# ---- command line ----


class InputError(ValueError):
  """A problem with the user's input that one line of text explains."""


def typed_id(token, ids: np.ndarray, where: str):
  """A raw id as the dataset's id type: int when its ids are integers, else str."""
  if not np.issubdtype(ids.dtype, np.integer):
    return str(token)
  if isinstance(token, bool) or not isinstance(token, (int, str)):
    raise InputError(f'{where}: {token!r} is not an integer id')
  try:
    return int(token)
  except ValueError:
    raise InputError(f'{where}: {token!r} is not an integer id') from None


class Query(NamedTuple):
  """One line of input: a history of raw ids, and what the output line echoes."""

  history: list
  echo: dict


def parse_line(line: str, where: str, recommender: Recommender) -> Query:
  """A CSV line of raw item ids, or a JSON object {"history": [...]} or {"user": ...}
  (optionally with an "id" echoed to the output)."""
  if not line.lstrip().startswith('{'):
    tokens = [t.strip() for t in next(csv.reader([line]), [])]
    return Query([typed_id(t, recommender.item_ids, where) for t in tokens if t], {})
  try:
    record = json.loads(line)
  except json.JSONDecodeError as error:
    raise InputError(f'{where}: not a JSON object ({error.msg} at column {error.colno})') from None
  if not isinstance(record, dict) or ('history' in record) == ('user' in record):
    raise InputError(f'{where}: expected an object with exactly one of "history" and "user"')
  echo = {key: record[key] for key in ('id', 'user') if key in record}
  if 'user' in record:
    user = typed_id(record['user'], recommender.user_ids, f'{where}: field "user"')
    try:
      return Query(recommender.user_history(user), echo)
    except KeyError as error:
      raise InputError(f'{where}: {error.args[0]}') from None
  if not isinstance(record['history'], list):
    raise InputError(f'{where}: field "history" must be a list of item ids')
  return Query([typed_id(t, recommender.item_ids, f'{where}: field "history"')
                for t in record['history']], echo)


def read_queries(path: str, recommender: Recommender) -> Iterator[Query]:
  if not os.path.isfile(path):
    raise InputError(f'{path}: no such file')
  with open(path, newline='') as f:
    for number, line in enumerate(f, 1):
      yield parse_line(line.rstrip('\r\n'), f'{path}:{number}', recommender)


def recommend_file(recommender: Recommender, path: str, k: int, *, exclude_seen: bool,
                   allowed_V: np.ndarray | None) -> Iterator[dict]:
  """The output records of every line of `path`, in order; one warning for unknown ids."""
  queries, unknown, dense_rows = [], [], []
  for query in read_queries(path, recommender):
    dense, missing = recommender.dense_items(query.history)
    queries.append(query)
    dense_rows.append(dense)
    unknown += missing
  warn_unknown(unknown, 'history')
  try:
    top = recommender.recommend_dense(dense_rows, k, exclude_seen=exclude_seen,
                                      allowed_V=allowed_V, progress=True)
  except TooFewItemsError as error:
    raise InputError(f'{path}:{error.row + 1}: {error}') from None
  for query, items, scores, popular in zip(queries, *top):
    yield _record(items, scores, popular, query.echo)


def _record(items: np.ndarray, scores: np.ndarray, popular: bool, echo: dict) -> dict:
  return {**echo, 'items': items.tolist(), 'scores': scores.tolist(),
          'source': 'popularity' if popular else 'model'}


def write_json_lines(records: Iterable[dict], path: str | None) -> None:
  """To stdout, or to `path` under a temporary name renamed into place when complete."""
  if path is None:
    for record in records:
      print(json.dumps(record))
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.tmp-', dir=directory)
  try:
    with os.fdopen(fd, 'w') as f:
      for record in records:
        f.write(json.dumps(record) + '\n')
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def define_flags() -> None:
  """The command line's flags (defined on demand: train.py imports this module)."""
  flags.DEFINE_string('workdir', None, 'A training run directory (its checkpoints/ and serving/).')
  flags.DEFINE_list('history', None, 'Raw item ids, oldest first (may be empty: --history=).')
  flags.DEFINE_string('user', None, "A dataset user's raw id: recommend after their history.")
  flags.DEFINE_string('input', None, 'A file of histories: CSV (one history of raw item ids a '
                      'line) or JSON lines ({"history": [...]} or {"user": ...}, optional "id").')
  flags.DEFINE_string('output', None, 'Write JSON lines here (written whole or not at all); '
                      'default: a table (--history, --user) or JSON lines (--input) on stdout.')
  flags.DEFINE_integer('k', 10, 'How many items.', lower_bound=1)
  flags.DEFINE_string('step', 'best', "Checkpoint: 'best', 'latest' or a step number.")
  flags.DEFINE_bool('exclude_seen', True, "Never recommend an item of the history itself.")
  flags.DEFINE_list('candidates', None, 'Recommend only among these raw item ids.')
  flags.DEFINE_string('data_dir', None, 'Only for workdirs trained before serving files existed: '
                      "where the run's dataset is (default: the saved config's data_dir).")


FLAGS = flags.FLAGS


def _records(recommender: Recommender) -> Iterator[dict]:
  allowed_V = None
  if FLAGS.candidates is not None:
    candidates = [typed_id(t, recommender.item_ids, '--candidates') for t in FLAGS.candidates]
    allowed_V, missing = recommender.candidate_mask(candidates)
    warn_unknown(missing, 'candidate')
  if FLAGS.input:
    yield from recommend_file(recommender, FLAGS.input, FLAGS.k,
                              exclude_seen=FLAGS.exclude_seen, allowed_V=allowed_V)
    return
  if FLAGS.user is not None:
    try:
      history = recommender.user_history(typed_id(FLAGS.user, recommender.user_ids, '--user'))
    except KeyError as error:
      raise InputError(f'--user: {error.args[0]}') from None
  else:
    history = [typed_id(t, recommender.item_ids, '--history') for t in FLAGS.history]
  dense, missing = recommender.dense_items(history)
  warn_unknown(missing, 'history')
  try:
    top = recommender.recommend_dense([dense], FLAGS.k, exclude_seen=FLAGS.exclude_seen,
                                      allowed_V=allowed_V)
  except TooFewItemsError as error:
    raise InputError(f'--k: {error}') from None
  yield _record(top.items[0], top.scores[0], top.popular[0], {})


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  given = [name for name in ('history', 'user', 'input') if FLAGS[name].value is not None]
  if len(given) != 1:
    sys.exit('error: give exactly one of --history, --user and --input')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # stdout is the product; warnings still show
  try:
    recommender = Recommender.from_workdir(FLAGS.workdir, FLAGS.step, data_dir=FLAGS.data_dir)
    records = _records(recommender)
    if FLAGS.input or FLAGS.output:
      write_json_lines(records, FLAGS.output)
    else:
      record = next(records)
      for rank, (item, score) in enumerate(zip(record['items'], record['scores']), 1):
        print(f'{rank:>3}  {item}  {score:.4f}')
  except (InputError, DataError, FileNotFoundError) as error:
    sys.exit(f'error: {error}')


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
