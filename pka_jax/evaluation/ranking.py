"""Ranking the whole catalog: scores masked where an item was seen, the top k kept, and a
target's rank in them. Scored in blocks of the item table (no `rows × N` scores at once),
each 'model' shard of a split table ranking its own rows before the shards' lists merge.
Evaluation (`rank_on_mesh`) and serving (`pka_jax.serving`) rank through this module."""

from __future__ import annotations

from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pka_jax import sharding
from pka_jax.model import item_table
from pka_jax.model.encoder import Encoder
from pka_jax.training.microbatching import map_microbatches, microbatches_for


# Columns per group of `grouped_top_k`.
TOP_K_GROUP = 16


def grouped_top_k(scores_BxN: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k(scores_BxN, k)`, values and indices alike (ties to the lower index), in
  two smaller selections where that is faster (long rows on CPU, whose top_k costs more
  than the scores' matrix product): the best of each group of TOP_K_GROUP columns, the `k`
  best groups, then the `k` best of their columns. Exact: a column outside the `k` best
  groups has `k` better columns ahead of it, one per group."""
  batch, n = scores_BxN.shape
  groups = -(-n // TOP_K_GROUP)
  if jax.default_backend() != 'cpu' or groups < 4 * k:
    return jax.lax.top_k(scores_BxN, k)
  # Trailing -inf columns lose every tie to the real ones, which come first.
  padded = jnp.pad(scores_BxN, ((0, 0), (0, groups * TOP_K_GROUP - n)),
                   constant_values=-jnp.inf)
  grouped_BxGxC = padded.reshape(batch, groups, TOP_K_GROUP)
  _, best_BxK = jax.lax.top_k(grouped_BxGxC.max(axis=2), k)
  best_BxK = jnp.sort(best_BxK, axis=1)  # candidates in column order, so ties go as in top_k
  candidates = jnp.take_along_axis(grouped_BxGxC, best_BxK[:, :, None], axis=1)
  values_BxK, at_BxK = jax.lax.top_k(candidates.reshape(batch, k * TOP_K_GROUP), k)
  columns = best_BxK[:, :, None] * TOP_K_GROUP + jnp.arange(TOP_K_GROUP)[None, None]
  return values_BxK, jnp.take_along_axis(columns.reshape(batch, -1), at_BxK, axis=1)


def top_k_ranks(
    scores_BxV: jax.Array, seen_BxS: jax.Array, targets_B: jax.Array, *, top_k: int
) -> tuple[jax.Array, jax.Array]:
  """Masks padding and seen items, then returns the top-k item ids and the target's rank.

  Ranks are 0-based positions in the top-k list, -1 when the target is not in it. List slots
  whose score is -inf (fewer than k items left unmasked) hold item 0 and never count as hits.
  Row-wise throughout, so it runs on rows sharded over devices without communication.
  """
  rows_Bx1 = jnp.arange(scores_BxV.shape[0])[:, None]
  scores_BxV = scores_BxV.at[rows_Bx1, seen_BxS].set(-jnp.inf).at[:, 0].set(-jnp.inf)
  return _ranked(*grouped_top_k(scores_BxV, top_k), targets_B)


def _ranked(top_scores_BxK, top_items_BxK, targets_B) -> tuple[jax.Array, jax.Array]:
  top_items_BxK = jnp.where(top_scores_BxK > -jnp.inf, top_items_BxK, 0)
  hit_BxK = top_items_BxK == targets_B[:, None]
  ranks_B = jnp.where(hit_BxK.any(axis=1), jnp.argmax(hit_BxK, axis=1), -1)
  return top_items_BxK.astype(jnp.int32), ranks_B.astype(jnp.int32)


def pair_top_k_ranks(scores_BxV: jax.Array, seen_rows_P: jax.Array, seen_items_P: jax.Array,
                     targets_B: jax.Array, *, top_k: int) -> tuple[jax.Array, jax.Array]:
  """`top_k_ranks` with the seen items given as (row, item) pairs."""
  scores_BxV = scores_BxV.at[seen_rows_P, seen_items_P].set(-jnp.inf).at[:, 0].set(-jnp.inf)
  return _ranked(*grouped_top_k(scores_BxV, top_k), targets_B)


pair_top_k_ranks_jit = jax.jit(pair_top_k_ranks, static_argnames='top_k')


# adjust(scores_BxK, item_K) -> scores_BxK: changes one block's scores before masking.
Adjust = Callable[[jax.Array, jax.Array], jax.Array]


def block_top_k(hidden_BxD: jax.Array, table_RxD: jax.Array, seen_rows_P: jax.Array,
                seen_items_P: jax.Array, *, first: int | jax.Array, num_items: int,
                top_k: int, block_size: int, adjust: Adjust | None = None,
                ) -> tuple[jax.Array, jax.Array]:
  """`(scores_BxK, items_BxK)`: the best of the table's rows `[first, first + R)` (global item
  ids) for each row of `hidden`, best first; -inf (item 0 or any) where fewer remain.

  Rows are scored `block_size` at a time, keeping a running top-k: no more than
  `B × block_size` scores exist at once. Item 0, rows past `num_items` and the (row, item)
  pairs seen are masked; `adjust` may change a block's scores first.
  """
  rows = table_RxD.shape[0]
  size = item_table.even_blocks(rows, block_size)
  blocks = -(-rows // size)
  keep = min(top_k, size)

  def block_top(index):
    # Sliced where it is scored: no padded copy of the table a batch.
    at, block_KxD, item_K, real_K = item_table.item_block(table_RxD, index, size, first,
                                                      num_items, hidden_BxD.dtype)
    scores_BxK = jnp.dot(hidden_BxD, block_KxD.T, preferred_element_type=jnp.float32)
    if adjust is not None:
      scores_BxK = adjust(scores_BxK, item_K)
    scores_BxK = jnp.where(real_K[None, :], scores_BxK, -jnp.inf)
    column_P = seen_items_P - (first + at)
    in_block_P = (seen_items_P > 0) & (column_P >= 0) & (column_P < size)
    scores_BxK = scores_BxK.at[seen_rows_P, jnp.where(in_block_P, column_P, size)].set(
        -jnp.inf, mode='drop')
    block_scores, block_columns = grouped_top_k(scores_BxK, keep)
    return block_scores, item_K[block_columns].astype(jnp.int32)

  def add_block(best, index):
    merged_scores, merged_items = (jnp.concatenate([a, b], axis=1)
                                   for a, b in zip(best, block_top(index)))
    top_scores, top_index = jax.lax.top_k(merged_scores, top_k)
    return (top_scores, jnp.take_along_axis(merged_items, top_index, axis=1)), None

  # The first block seeds the running list (under shard_map it carries the right type).
  first_scores, first_items = block_top(0)
  start = (jnp.pad(first_scores, ((0, 0), (0, top_k - keep)), constant_values=-jnp.inf),
           jnp.pad(first_items, ((0, 0), (0, top_k - keep))))
  (scores_BxK, items_BxK), _ = jax.lax.scan(add_block, start, jnp.arange(1, blocks))
  return scores_BxK, items_BxK


def sharded_top_k(hidden_BxD: jax.Array, table_RxD: jax.Array, seen_rows_P: jax.Array,
                  seen_items_P: jax.Array, targets_B: jax.Array, *, num_items: int, top_k: int,
                  block_size: int) -> tuple[jax.Array, jax.Array]:
  """Top-k items and target ranks, run inside shard_map over ('data', 'model').

  This 'model' shard ranks its rows of the item table (`block_top_k`); the shards' lists
  are gathered over 'model' and merged. No device holds more than `B × block_size` scores.
  """
  scores_BxK, items_BxK = block_top_k(
      hidden_BxD, table_RxD, seen_rows_P, seen_items_P,
      first=sharding.shard_range(table_RxD.shape[0]), num_items=num_items, top_k=top_k,
      block_size=block_size)
  return _ranked(*merge_shard_lists(scores_BxK, items_BxK, top_k), targets_B)


def merge_shard_lists(scores_BxK: jax.Array, items_BxK: jax.Array, top_k: int
                      ) -> tuple[jax.Array, jax.Array]:
  """Inside shard_map: every 'model' shard's top-k list merged into the global one."""
  # Gathered in shard order: ties keep the lower item id, as one top_k over all would.
  all_scores, all_items = (
      jax.lax.all_gather(x, sharding.MODEL, axis=1, tiled=True, to='invarying')
      for x in (scores_BxK, items_BxK))
  top_scores, top_index = jax.lax.top_k(all_scores, top_k)
  return top_scores, jnp.take_along_axis(all_items, top_index, axis=1)


def rank_on_mesh(params, inputs_BxT, seen_rows_P, seen_items_P, targets_B, *, config,
                 mesh: jax.sharding.Mesh, model: Encoder, num_items: int):
  """Top-k lists and target ranks of an evaluation batch (`Placement.rank_fn`): `model` (the
  deterministic encoder) over microbatches of each device's rows, then the scores of each
  'model' shard's items, blockwise (sharded_top_k)."""
  data_shards = mesh.shape[sharding.DATA]
  rows_per_device = config.eval_batch_size // data_shards
  encode = functools.partial(model.apply, {'params': params}, method=Encoder.encode_last)
  hidden_BxD = map_microbatches(
      encode, microbatches_for(rows_per_device, inputs_BxT.shape[1]), inputs_BxT)
  table_VxD = params['item_emb']['embedding']
  rows_per_shard = table_VxD.shape[0] // mesh.shape[sharding.MODEL]
  top_k = functools.partial(
      sharded_top_k, num_items=num_items, top_k=config.top_k,
      block_size=item_table.chunk_rows_for(rows_per_device, rows_per_shard))
  data, model_rows = P(sharding.DATA), P(sharding.MODEL)
  return jax.shard_map(top_k, mesh=mesh, in_specs=(data, model_rows, data, data, data),
                       out_specs=(data, data))(
                           hidden_BxD, table_VxD, seen_rows_P, seen_items_P, targets_B)


# Rows a recommendation batch holds at most (serving.recommender.BATCH_SHAPES): the blocks of
# the item table are sized for them.
RECOMMEND_ROWS = 512


def top_k_scores(model: Encoder, params, inputs_BxT: jax.Array, seen_BxS: jax.Array,
                 allowed_V: jax.Array, popularity_V: jax.Array, *, k: int,
                 ) -> tuple[jax.Array, jax.Array]:
  """The k best items after each history and their scores: `(items_BxK int32, scores_BxK)`.

  Rows whose input is all padding are scored by `popularity_V`; then padding, the `seen_BxS`
  items (dense ids, 0-padded) and items outside `allowed_V` are masked. Slots left without an
  item hold item 0 and score -inf. The catalog is scored in blocks (`block_top_k`):
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
    scores, items = merge_shard_lists(scores, items, k)
    return jnp.where(scores > -jnp.inf, items, 0), scores

  replicated = P()
  return jax.shard_map(
      per_shard, mesh=mesh, in_specs=(replicated, P(sharding.MODEL)) + (replicated,) * 5,
      out_specs=(replicated, replicated))(
          hidden_BxD, table_RxD, *seen, empty_Bx1, allowed_V, popularity_V)


def _top_k_of_rows(hidden_BxD, table_RxD, seen_rows_P, seen_items_P, empty_Bx1, allowed_V,
                   popularity_V, *, first, k: int) -> tuple[jax.Array, jax.Array]:
  """`(items_BxK, scores_BxK)` of table rows `[first, first + R)` (`block_top_k`)."""
  last_V = allowed_V.shape[0] - 1

  def adjust(scores_BxK, item_K):
    item_K = jnp.minimum(item_K, last_V)  # rows past the catalog are masked after this
    scores_BxK = jnp.where(empty_Bx1, popularity_V[item_K][None].astype(jnp.float32),
                           scores_BxK)
    return jnp.where(allowed_V[item_K][None], scores_BxK, -jnp.inf)

  top_scores_BxK, top_items_BxK = block_top_k(
      hidden_BxD, table_RxD, seen_rows_P, seen_items_P, first=first, num_items=last_V,
      top_k=k, adjust=adjust,
      block_size=item_table.chunk_rows_for(RECOMMEND_ROWS, table_RxD.shape[0]))
  return jnp.where(top_scores_BxK > -jnp.inf, top_items_BxK, 0), top_scores_BxK
