"""An evaluator: the successive protocol on a dataset's parts for one ranking program, owning
what it can keep between passes (each part's steps, the validation batches)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import jax

from pka_jax.data.sequences import SplitDataset
from pka_jax.evaluation import protocol

# Host memory for the validation batches, which are the same every epoch: built once and kept
# up to this size (33 MiB at ML-1M's synthetic shapes); past it, built again for every pass.
VALIDATION_BATCH_BYTES = 1 << 30

# rank(params, batch) -> (top_items_BxK, ranks_B), dispatched (Placement.rank).
Rank = Callable[[object, protocol.EvalBatch], tuple[jax.Array, jax.Array]]


class Evaluator:
  """Metrics of parameters on 'valid' or 'test' of `dataset`, ranked by `rank`.

  `shards` and `held` are `SuccessiveSteps.batch`'s (the mesh's data shards and those whose
  rows this host builds), `windows` its `trim` and `padding_column` options
  (Placement.evaluation_windows).
  """

  def __init__(self, dataset: SplitDataset, rank: Rank, *, maxlen: int, batch_size: int,
               top_k: int, shards: int = 1, held: Sequence[int] | None = None,
               windows: dict[str, bool] | None = None):
    self.dataset, self.rank = dataset, rank
    self.maxlen, self.batch_size, self.top_k = maxlen, batch_size, top_k
    self.shards, self.held, self.windows = shards, held, windows or {}
    self._steps: dict[str, protocol.SuccessiveSteps] = {}
    self._validation_batches: list[protocol.EvalBatch] | None = None

  def steps(self, part: str) -> protocol.SuccessiveSteps:
    """The part's evaluation steps, indexed once."""
    if part not in self._steps:
      self._steps[part] = protocol.successive_steps(self.dataset, part, maxlen=self.maxlen)
    return self._steps[part]

  def batches(self, part: str) -> Iterable[protocol.EvalBatch]:
    """This host's batches of a pass over `part`. Those of 'valid', the same every epoch, are
    kept from the first complete pass while they fit `VALIDATION_BATCH_BYTES`: on an H200,
    building them took 56 of a pass's 94 ms (ML-1M)."""
    if part == 'valid' and self._validation_batches is not None:
      return self._validation_batches
    batches = self.steps(part).pass_batches(self.batch_size, shards=self.shards,
                                            held=self.held, **self.windows)
    return self._keeping_validation_batches(batches) if part == 'valid' else batches

  def _keeping_validation_batches(self, batches: Iterable[protocol.EvalBatch]
                                  ) -> Iterator[protocol.EvalBatch]:
    kept, size = [], 0
    for batch in batches:
      size += sum(array.nbytes for array in batch)
      if size <= VALIDATION_BATCH_BYTES:
        kept.append(batch)
      yield batch
    # Kept after a complete pass only (an interrupted one stops above), and all of it or none.
    self._validation_batches = kept if size <= VALIDATION_BATCH_BYTES else None

  def evaluate(self, part: str, params, *, interrupt: Callable[[], bool] | None = None,
               before_batch: Callable[[], None] | None = None) -> dict[str, float]:
    """Metrics of `params` (laid out as `rank` takes them) on `part`. `interrupt()`, asked
    after each batch, stops the pass with `protocol.Interrupted`; `before_batch()` runs
    before each batch is ranked."""

    def rank(batch: protocol.EvalBatch):
      if before_batch is not None:
        before_batch()
      return self.rank(params, batch)

    return protocol.evaluate_ranked(
        rank, self.dataset, part, maxlen=self.maxlen, batch_size=self.batch_size,
        top_k=self.top_k, steps=self.steps(part), interrupt=interrupt,
        batches=self.batches(part))
