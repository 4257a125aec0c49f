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

from absl import logging
import jax
import numpy as np
import tqdm

from pka_jax.data.sequences import (Events, SequenceStore, SplitDataset, power_of_two_at_least,
                                    window_width)
from pka_jax.evaluation import metrics
from pka_jax.evaluation import ranking


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


# rank_fn(batch) -> (top_items_BxK, ranks_B): scoring, masking and top-k for one batch.
RankFn = Callable[[EvalBatch], tuple[jax.Array, jax.Array]]


def ranker_from_scores(score_fn: ScoreFn, num_items: int, top_k: int) -> RankFn:
  """A rank function from `score_fn(inputs_BxT) -> scores_BxV` (column 0 is padding)."""

  def rank(batch: EvalBatch) -> tuple[jax.Array, jax.Array]:
    scores_BxV = score_fn(batch.inputs_BxT)
    _check_vocab(scores_BxV, num_items)
    return ranking.pair_top_k_ranks_jit(scores_BxV, batch.seen_rows_P, batch.seen_items_P,
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
