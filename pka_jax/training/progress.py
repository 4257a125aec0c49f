"""What a run records besides its parameters: epochs done, the data iterator inside an epoch,
and the validation history that early stopping reads."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Progress:
  """What a checkpoint records about the run besides the parameters (saved as JSON)."""

  epoch: int = 0  # completed epochs
  data_iterator: dict | None = None  # grain state inside the current epoch, None at its start
  best_ndcg: float = -1.0
  best_step: int = -1
  bad_validations: int = 0
  history: list = dataclasses.field(default_factory=list)  # validation metrics per epoch

  def best_validation(self) -> dict[str, float]:
    """The validation metrics recorded at `best_step` (without the 'valid/' prefix)."""
    record = next(r for r in self.history if r['step'] == self.best_step)
    return {k.removeprefix('valid/'): v for k, v in record.items() if k.startswith('valid/')}

  def record_validation(self, ndcg: float, step: int) -> bool:
    """Notes a validation's NDCG@10 at `step` for early stopping; whether it is a new best
    (ties go to the earlier step)."""
    improved = ndcg > self.best_ndcg
    if improved:
      self.best_ndcg, self.best_step, self.bad_validations = ndcg, step, 0
    else:
      self.bad_validations += 1
    return improved

  def finished(self, max_epochs: int, patience: int) -> bool:
    return self.epoch >= max_epochs or self.bad_validations >= patience

  def validation_pending(self) -> bool:
    """The last epoch's training is done and saved but not yet validated."""
    validated = self.history[-1]['epoch'] if self.history else 0
    return self.data_iterator is None and self.epoch > validated
