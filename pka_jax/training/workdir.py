"""A run's workdir: writable before any work, and never resumed by a run of another
configuration."""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile

import ml_collections

from pka_jax.model.encoder import ModelConfig


# Fields that define the parameters, the data or the course of training a checkpoint belongs
# to. Left out: limits a resumed run may change (max_epochs, patience), and settings that
# compute the same function (attention_impl, layer_norm_impl, ffn_impl, microbatches, loss
# chunking, eval batch size).
RUN_DEFINING_FIELDS = tuple(sorted(
    {f.name for f in dataclasses.fields(ModelConfig)}
    - {'num_items', 'deterministic', 'attention_impl', 'layer_norm_impl', 'ffn_impl'}
    | {'dataset', 'q_valid', 'q_test', 'max_eval', 'synthetic', 'seed', 'batch_size',
       'prng_impl', 'loss', 'learning_rate', 'adam_b1', 'adam_b2'}))


class WorkdirMismatchError(ValueError):
  """The workdir's checkpoints belong to a run of another configuration."""


class WorkdirError(OSError):
  """The workdir cannot be written."""


def check_writable(workdir: str) -> None:
  """Raises WorkdirError naming `workdir` unless the run can create files there."""
  if re.match(r'[a-z][a-z0-9+.-]*://', workdir):
    raise WorkdirError(f'the workdir {workdir} is a URL: runs read and write it as a '
                       'directory; mount the bucket (gcsfuse) and give the mounted path')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as error:
    raise WorkdirError(f'cannot write to the workdir {workdir}: '
                       f'{error.strerror or error}') from None


def check_same_run(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict,
                   workdir: str) -> None:
  """Refuses to resume or evaluate a workdir whose checkpoints come from another model."""
  differences = [f'{name}: {saved.get(name)!r} there, {config.get(name)!r} here'
                 for name in RUN_DEFINING_FIELDS
                 if _plain(saved.get(name)) != _plain(config.get(name))]
  if differences:
    raise WorkdirMismatchError(f'{workdir} holds a run of another configuration ('
                               + '; '.join(differences) + '): use another --workdir')


def _plain(value):
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
