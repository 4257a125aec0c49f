"""The successive evaluation protocol (DESIGN §3): fixed-shape batches, seen-item masking, top-k.

Every held-out interaction of a part is one step, in global time order. The step's context is
the user's history before the part (train for 'valid', train + validation for 'test') followed by
that user's earlier held-out items of the part. Steps with an empty context are skipped, but their
item still joins the user's history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from pka_jax import metrics
from pka_jax.data.sequences import Events, SequenceStore, SplitDataset

ScoreFn = Callable[[jax.Array], jax.Array]


class Interrupted(Exception):
  """`evaluate_ranked`'s `interrupt` asked it to stop before the last batch."""


class EvalBatch(NamedTuple):
  """One batch of steps; every array has the batch dimension first."""

  inputs_BxT: np.ndarray  # int32: the last T context items, left-padded with 0
  targets_B: np.ndarray  # int32: the held-out item (0 on padding rows)
  seen_BxS: np.ndarray  # int32: every context item, right-padded with 0; S is a power of two
  valid_B: np.ndarray  # bool: False on the padding rows that fill the last batch


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

  def batch(self, start: int, batch_size: int) -> EvalBatch:
    """Steps `start .. start + batch_size`, padded with invalid rows past the last step."""
    stop = min(start + batch_size, len(self))
    pad = batch_size - (stop - start)
    begin_B = np.pad(self.histories.offsets[self.user[start:stop]], (0, pad))
    length_B = np.pad(self.length[start:stop], (0, pad))
    items = self.histories.items

    position_BxT = length_B[:, None] - self.maxlen + np.arange(self.maxlen)
    inputs_BxT = _take(items, begin_B[:, None] + position_BxT, position_BxT >= 0)

    width = _power_of_two_at_least(max(self.maxlen, int(length_B.max())))
    position_1xS = np.arange(width)[None, :]
    seen_BxS = _take(items, begin_B[:, None] + position_1xS, position_1xS < length_B[:, None])

    return EvalBatch(
        inputs_BxT=inputs_BxT,
        targets_B=np.pad(self.target[start:stop], (0, pad)).astype(np.int32),
        seen_BxS=seen_BxS,
        valid_B=np.arange(batch_size) < stop - start)

  def batches(self, batch_size: int) -> Iterator[EvalBatch]:
    """Fixed-shape batches over all steps, built lazily in step order."""
    for start in range(0, len(self), batch_size):
      yield self.batch(start, batch_size)


def _take(items: np.ndarray, index_BxW: np.ndarray, valid_BxW: np.ndarray) -> np.ndarray:
  return np.where(valid_BxW, items[np.where(valid_BxW, index_BxW, 0)], 0).astype(np.int32)


def _power_of_two_at_least(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


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
  top_scores_BxK, top_items_BxK = jax.lax.top_k(scores_BxV, top_k)
  top_items_BxK = jnp.where(top_scores_BxK > -jnp.inf, top_items_BxK, 0)
  hit_BxK = top_items_BxK == targets_B[:, None]
  ranks_B = jnp.where(hit_BxK.any(axis=1), jnp.argmax(hit_BxK, axis=1), -1)
  return top_items_BxK.astype(jnp.int32), ranks_B.astype(jnp.int32)


_top_k_ranks_jit = jax.jit(top_k_ranks, static_argnames='top_k')

# rank_fn(batch) -> (top_items_BxK, ranks_B): scoring, masking and top-k for one batch.
RankFn = Callable[[EvalBatch], tuple[jax.Array, jax.Array]]


def ranker_from_scores(score_fn: ScoreFn, num_items: int, top_k: int) -> RankFn:
  """A rank function from `score_fn(inputs_BxT) -> scores_BxV` (column 0 is padding)."""

  def rank(batch: EvalBatch) -> tuple[jax.Array, jax.Array]:
    scores_BxV = score_fn(batch.inputs_BxT)
    _check_vocab(scores_BxV, num_items)
    return _top_k_ranks_jit(scores_BxV, batch.seen_BxS, batch.targets_B, top_k=top_k)

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
) -> dict[str, float]:
  """`evaluate` with the scoring, masking and top-k of a batch fused in `rank_fn`.

  `progress=None` shows a progress bar only when absl logs at INFO. `steps` are the part's
  `successive_steps`, when the caller keeps them between evaluations. `interrupt()`, asked
  after each batch, stops the evaluation with `Interrupted` when it returns True.
  """
  if steps is None:
    steps = successive_steps(dataset, part, maxlen=maxlen)
  accumulator = metrics.RankingAccumulator(k=top_k, num_items=dataset.num_items)
  if progress is None:
    progress = logging.level_info()
  batches = tqdm.tqdm(
      steps.batches(batch_size),
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
