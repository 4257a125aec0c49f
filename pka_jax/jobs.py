"""What the commands run: training (or testing a checkpoint), then the files that let the
workdir alone recommend. `pka_jax.main`, the grid of runs and tuning trials all go through
here, so that every workdir is left the same way."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from pka_jax.serving import files as serving_files
from pka_jax.training.loop import Trainer


def train(config: ml_collections.ConfigDict, workdir: str, *,
          train_devices: int | None = None,
          on_validation: Callable[[int, dict[str, float]], None] | None = None) -> dict:
  """Trains until early stopping (resuming from the latest checkpoint), tests the best
  checkpoint and writes the serving files; the results (also in `results.json`).
  `train_devices`: as `Placement`'s; `on_validation`: as `Trainer.train_and_test`'s."""
  trainer = Trainer.create(config, workdir, train_devices=train_devices)
  results = trainer.train_and_test(on_validation)
  serving_files.write_serving_files(workdir, trainer.dataset)
  return results


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             train_devices: int | None = None) -> dict:
  """Tests the best checkpoint of `workdir` again, without training."""
  trainer = Trainer.create(config, workdir, train_devices=train_devices)
  results = trainer.test_checkpoint()
  serving_files.write_serving_files(workdir, trainer.dataset)
  return results
