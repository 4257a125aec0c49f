"""The successive evaluation protocol (docs/design.md §3): fixed-shape batches, seen-item
masking, top-k.

Every held-out interaction of a part is one step, in global time order. The step's context is
the user's history before the part (train for 'valid', train + validation for 'test') followed by
that user's earlier held-out items of the part. Steps with an empty context are skipped, but their
item still joins the user's history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from pka_jax import losses
from pka_jax import metrics
from pka_jax import sharding
from pka_jax.data.sequences import (Events, SequenceStore, SplitDataset, power_of_two_at_least,
                                    window_width)

ScoreFn = Callable[[jax.Array], jax.Array]


class Interrupted(Exception):
  """`evaluate_ranked`'s `interrupt` asked it to stop before the last batch."""


class EvalBatch(NamedTuple):
  """The rows of one batch of steps that a host builds (all of them on one host).

  Rows come in `shards` equal blocks, one per 'data' shard of the mesh. The items every step
  has seen are listed as (row, item) pairs, row counted within its block: each block's pairs
  padded with (0, 0) to one power-of-two length, so that no array is as wide as the longest
  history (a user of 10⁵ events would make a dense `B × S` mask of the whole batch that wide).
  """

  inputs_BxT: np.ndarray  # int32: the last T context items, left-padded with 0
  targets_B: np.ndarray  # int32: the held-out item (0 on padding rows)
  seen_rows_P: np.ndarray  # int32: row of each seen (row, item) pair, within its block
  seen_items_P: np.ndarray  # int32: item of each pair (0: padding)
  valid_B: np.ndarray  # bool, for every row of the batch (held or not): False past the last step


@dataclasses.dataclass(frozen=True)
class SuccessiveSteps:
  """The evaluated steps of one part: step i predicts `target[i]` from the first `length[i]`
  items of `histories[user[i]]`."""

  histories: SequenceStore  # per user: the context before the part, then the part's items
  user: np.ndarray  # int32 [num_steps]
  length: np.ndarray  # int64 [num_steps], >= 1
  target: np.ndarray  # int32 [num_steps]
  maxlen: int  # T

  def __len__(self) -> int:
    return len(self.target)

  def num_batches(self, batch_size: int) -> int:
    return -(-len(self) // batch_size)

  def by_context_length(self) -> SuccessiveSteps:
    """The same steps, shortest window first (stable): batches of similar contexts, which
    `batch(trim=True)` cuts to narrow windows. Metrics do not depend on the order."""
    order = np.argsort(np.minimum(self.length, self.maxlen), kind='stable')
    return dataclasses.replace(self, user=self.user[order], length=self.length[order],
                               target=self.target[order])

  def batch(self, start: int, batch_size: int, *, shards: int = 1,
            held: Sequence[int] | None = None, trim: bool = False,
            padding_column: bool = False) -> EvalBatch:
    """Steps `start .. start + batch_size` (invalid rows past the last step) in `shards` row
    blocks, of which only the blocks in `held` (all by default) are built.

    With `trim`, the window is `window_width` of the batch's longest context instead of
    `maxlen`: the columns dropped are padding in every row (exact where the model's
    `trims_exactly`; with `padding_column`, which keeps one padding column in every row
    that is not full, where its `padding_keys_alike`)."""
    step_B = start + np.arange(batch_size)
    real_B = step_B < len(self)
    index_B = np.where(real_B, step_B, 0)
    length_B = np.where(real_B, self.length[index_B], 0)
    longest = int(length_B.max()) + int(padding_column)
    window = window_width(longest, self.maxlen) if trim else self.maxlen
    # Every block's pairs get the same length, known from the lengths of all the rows.
    per_block = length_B.reshape(shards, batch_size // shards).sum(axis=1)
    width = power_of_two_at_least(max(int(per_block.max()), 1))
    rows_per_block = batch_size // shards
    rows = np.concatenate([np.arange(b * rows_per_block, (b + 1) * rows_per_block)
                           for b in (range(shards) if held is None else held)])
    begin_R = self.histories.offsets[self.user[index_B[rows]]]
    length_R = length_B[rows]
    items = self.histories.items

    position_RxT = length_R[:, None] - window + np.arange(window)
    inputs_RxT = _take(items, begin_R[:, None] + position_RxT, position_RxT >= 0)
    pairs = [_seen_pairs(items, begin_R[b:b + rows_per_block], length_R[b:b + rows_per_block],
                         width) for b in range(0, len(rows), rows_per_block)]
    return EvalBatch(
        inputs_BxT=inputs_RxT,
        targets_B=np.where(real_B[rows], self.target[index_B[rows]], 0).astype(np.int32),
        seen_rows_P=np.concatenate([r for r, _ in pairs]),
        seen_items_P=np.concatenate([i for _, i in pairs]),
        valid_B=real_B)

  def batches(self, batch_size: int, *, shards: int = 1,
              held: Sequence[int] | None = None, trim: bool = False,
              padding_column: bool = False) -> Iterator[EvalBatch]:
    """Batches over all steps, built lazily in step order; all of one shape unless `trim`."""
    for start in range(0, len(self), batch_size):
      yield self.batch(start, batch_size, shards=shards, held=held, trim=trim,
                       padding_column=padding_column)

  def pass_batches(self, batch_size: int, *, shards: int = 1,
                   held: Sequence[int] | None = None, trim: bool = False,
                   padding_column: bool = False) -> Iterator[EvalBatch]:
    """The batches an evaluation pass runs: in step order, or with `trim` shortest context
    first in windows cut to each batch's longest context (`batch`)."""
    steps = self.by_context_length() if trim else self
    return steps.batches(batch_size, shards=shards, held=held, trim=trim,
                         padding_column=padding_column)


def _seen_pairs(items: np.ndarray, begin_R: np.ndarray, length_R: np.ndarray,
                width: int) -> tuple[np.ndarray, np.ndarray]:
  """(row, item) for the first `length` items after `begin` of each row, padded to `width`."""
  total = int(length_R.sum())
  row_P = np.repeat(np.arange(len(length_R), dtype=np.int32), length_R)
  within_P = np.arange(total) - np.repeat(np.cumsum(length_R) - length_R, length_R)
  item_P = items[np.repeat(begin_R, length_R) + within_P]
  pad = width - total
  return (np.pad(row_P, (0, pad)).astype(np.int32),
          np.pad(item_P, (0, pad)).astype(np.int32))


def _take(items: np.ndarray, index_BxW: np.ndarray, valid_BxW: np.ndarray) -> np.ndarray:
  return np.where(valid_BxW, items[np.where(valid_BxW, index_BxW, 0)], 0).astype(np.int32)


def _append(store: SequenceStore, events: Events) -> tuple[SequenceStore, np.ndarray]:
  """Appends each user's events, in their order, to the user's sequence.

  Returns the new store and, for every event, its position in its user's new sequence (the
  length of the history it follows).
  """
  users = np.concatenate([np.repeat(np.arange(len(store)), store.lengths()), events.user])
  items = np.concatenate([store.items, events.item])
  # Stable: each user's stored items stay first and in order, then their events in event order.
  order = np.argsort(users, kind='stable')
  merged = SequenceStore.from_sorted(users[order], items[order], len(store))
  slot = np.empty(len(order), dtype=np.int64)
  slot[order] = np.arange(len(order))
  positions = slot[len(store.items):] - merged.offsets[events.user]
  return merged, positions


def successive_steps(dataset: SplitDataset, part: str, *, maxlen: int) -> SuccessiveSteps:
  """The steps of part 'valid' or 'test' under the successive protocol."""
  if part == 'valid':
    before, held_out = dataset.train, dataset.valid
  elif part == 'test':
    before, _ = _append(dataset.train, dataset.valid)
    held_out = dataset.test
  else:
    raise ValueError(f"part must be 'valid' or 'test', got {part!r}")
  histories, length = _append(before, held_out)
  evaluated = length > 0
  return SuccessiveSteps(
      histories=histories,
      user=held_out.user[evaluated],
      length=length[evaluated],
      target=held_out.item[evaluated],
      maxlen=maxlen)


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


_pair_top_k_ranks_jit = jax.jit(pair_top_k_ranks, static_argnames='top_k')


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
  size = losses.even_blocks(rows, block_size)
  blocks = -(-rows // size)
  keep = min(top_k, size)

  def block_top(index):
    # Sliced where it is scored: no padded copy of the table a batch.
    at, block_KxD, item_K, real_K = losses.item_block(table_RxD, index, size, first,
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


# rank_fn(batch) -> (top_items_BxK, ranks_B): scoring, masking and top-k for one batch.
RankFn = Callable[[EvalBatch], tuple[jax.Array, jax.Array]]


def ranker_from_scores(score_fn: ScoreFn, num_items: int, top_k: int) -> RankFn:
  """A rank function from `score_fn(inputs_BxT) -> scores_BxV` (column 0 is padding)."""

  def rank(batch: EvalBatch) -> tuple[jax.Array, jax.Array]:
    scores_BxV = score_fn(batch.inputs_BxT)
    _check_vocab(scores_BxV, num_items)
    return _pair_top_k_ranks_jit(scores_BxV, batch.seen_rows_P, batch.seen_items_P,
                                 batch.targets_B, top_k=top_k)

  return rank


def evaluate(score_fn: ScoreFn, dataset: SplitDataset, part: str, *, top_k: int = 10,
             **options) -> dict[str, float]:
  """Runs the successive protocol on `part` and returns the metrics at `top_k`.

  `score_fn(inputs_BxT) -> scores_BxV` scores the whole catalog (V = num_items + 1, column 0 is
  padding); the caller closes over the parameters. `options` are `evaluate_ranked`'s.
  """
  return evaluate_ranked(ranker_from_scores(score_fn, dataset.num_items, top_k), dataset, part,
                         top_k=top_k, **options)


def evaluate_ranked(
    rank_fn: RankFn,
    dataset: SplitDataset,
    part: str,
    *,
    maxlen: int,
    batch_size: int,
    top_k: int = 10,
    progress: bool | None = None,
    steps: SuccessiveSteps | None = None,
    interrupt: Callable[[], bool] | None = None,
    shards: int = 1,
    held: Sequence[int] | None = None,
    trim: bool = False,
    padding_column: bool = False,
    batches: Iterable[EvalBatch] | None = None,
) -> dict[str, float]:
  """`evaluate` with the scoring, masking and top-k of a batch fused in `rank_fn`.

  `progress=None` shows a progress bar only when absl logs at INFO. `steps` are the part's
  `successive_steps`, when the caller keeps them between evaluations. `interrupt()`, asked
  after each batch, stops the evaluation with `Interrupted` when it returns True. `shards` and
  `held` are `SuccessiveSteps.batch`'s: `rank_fn` gets this host's rows and returns every
  row's results. With `trim`, steps run shortest context first in windows cut to their
  batch's longest context (`rank_fn` then sees a few widths); only for a model that
  `trims_exactly`, or with `padding_column` one whose `padding_keys_alike`. `batches`, when
  given, are that pass's batches built already (`steps.pass_batches` with these options).
  """
  if steps is None:
    steps = successive_steps(dataset, part, maxlen=maxlen)
  accumulator = metrics.RankingAccumulator(k=top_k, num_items=dataset.num_items)
  if progress is None:
    progress = logging.level_info()
  if batches is None:
    batches = steps.pass_batches(batch_size, shards=shards, held=held, trim=trim,
                                 padding_column=padding_column)
  batches = tqdm.tqdm(
      batches,
      total=steps.num_batches(batch_size),
      desc=f'evaluate {part}',
      disable=not progress)
  # Batch i + 1 is built and dispatched before batch i's results are pulled to the host.
  pending = None
  for batch in batches:
    outputs = rank_fn(batch)
    if pending is not None:
      _accumulate(accumulator, *pending)
    pending = outputs, batch.valid_B
    if interrupt is not None and interrupt():
      raise Interrupted(f'evaluation of {part} interrupted')
  if pending is not None:
    _accumulate(accumulator, *pending)
  summary = accumulator.summarize()
  logging.info('evaluate %s: %s', part, summary)
  return summary


def _check_vocab(scores_BxV: jax.Array, num_items: int) -> None:
  if scores_BxV.shape[-1] != num_items + 1:
    raise ValueError(
        f'score_fn returned {scores_BxV.shape[-1]} scores per row; expected num_items + 1 = '
        f'{num_items + 1} (column 0 is the padding id)')


def _accumulate(
    accumulator: metrics.RankingAccumulator,
    outputs: tuple[jax.Array, jax.Array],
    valid_B: np.ndarray,
) -> None:
  top_items_BxK, ranks_B = jax.device_get(outputs)
  accumulator.add(ranks_B, top_items_BxK, valid_B)
