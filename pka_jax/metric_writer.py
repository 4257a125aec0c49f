"""Metrics to the workdir: JSON lines (`metrics.jsonl`) and TensorBoard event files."""

from __future__ import annotations

import json
import os

import jax
import tensorboardX


class MetricWriter:
  """Writes scalars from process 0 only; every other process gets a no-op writer."""

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    if self._enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
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
