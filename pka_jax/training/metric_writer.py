"""Metrics to the workdir: JSON lines (`metrics.jsonl`) and TensorBoard event files."""

from __future__ import annotations

import json
import os

import jax
import tensorboardX

from pka_jax import files


class MetricWriter:
  """Writes scalars from process 0 only; every other process gets a no-op writer.

  `after_step`: the step a resumed run starts from; earlier records past it (work the run
  does again) are dropped first, so that no step is recorded twice.
  """

  def __init__(self, workdir: str, after_step: int | None = None):
    self._enabled = jax.process_index() == 0
    if self._enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      if after_step is not None and os.path.exists(path):
        _drop_records_after(path, after_step)
      self._jsonl = open(path, 'a')
      self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self._enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record, sort_keys=True) + '\n')
    self._jsonl.flush()
    for name, value in scalars.items():
      # TensorBoard tags allow no '@': ndcg@10 becomes ndcg_at_10.
      self._tensorboard.add_scalar(name.replace('@', '_at_'), float(value), int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()


def _drop_records_after(path: str, step: int) -> None:
  """Rewrites `path` (atomically) without its records of steps after `step`."""
  with open(path) as f:
    lines = f.readlines()
  kept = [line for line in lines if _record_step(line) <= step]
  if len(kept) == len(lines):
    return
  files.write_text(path, ''.join(kept))


def _record_step(line: str) -> float:
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):  # a line cut short by a crash
    return float('inf')
