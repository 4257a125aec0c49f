"""Prepares a dataset and prints its statistics.

  python -m pka_jax.data --dataset=ml1m --data_dir=data

Exits with status 1 and the reason (no traceback) when the raw file is missing or malformed.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app
from absl import flags

from pka_jax.data import prepare, registry
from pka_jax.data.errors import DataError

_DATASET = flags.DEFINE_enum('dataset', None, sorted(registry.DATASETS), 'Dataset to prepare.')
_DATA_DIR = flags.DEFINE_string('data_dir', 'data', 'Raw files in DATA_DIR/<dataset>/.')
_Q_VALID = flags.DEFINE_float('q_valid', 0.95, 'Validation quantile of time.')
_Q_TEST = flags.DEFINE_float('q_test', 0.97, 'Test quantile of time.')
_MAX_EVAL = flags.DEFINE_integer('max_eval', 50_000, 'Cap on validation interactions.')
_MIN_RATING = flags.DEFINE_float('min_rating', None, 'Override: keep ratings >= this.')
_MIN_USER = flags.DEFINE_integer('min_user_interactions', None, 'Override: k-core for users.')
_MIN_ITEM = flags.DEFINE_integer('min_item_interactions', None, 'Override: k-core for items.')
_DOWNLOAD = flags.DEFINE_bool('download', True, 'Download a missing raw file when possible.')
_FORCE = flags.DEFINE_bool('force', False, 'Rebuild the store even if it is current.')
flags.mark_flag_as_required('dataset')


def _overrides() -> dict:
  chosen = {'min_rating': _MIN_RATING.value, 'min_user_interactions': _MIN_USER.value,
            'min_item_interactions': _MIN_ITEM.value}
  return {k: v for k, v in chosen.items() if v is not None}


def format_stats(prepared: prepare.Prepared) -> str:
  """The statistics table printed by the command."""
  meta = prepared.meta
  stats, split = meta['stats']['preprocessed'], meta['stats']['split']
  rows = [
      ('dataset', f'{meta["dataset"]} ({meta["title"]})'),
      ('interaction', meta['interaction']),
      ('store', f'{prepared.directory} ({"reused" if prepared.reused else "built"})'),
      ('raw interactions read', f'{meta["stats"]["read"]["interactions"]:,}'),
      ('users', f'{stats["users"]:,}'),
      ('items', f'{stats["items"]:,}'),
      ('interactions', f'{stats["interactions"]:,}'),
      ('mean sequence length', f'{stats["mean_sequence_length"]:.1f}'),
      ('median sequence length', f'{stats["median_sequence_length"]:g}'),
      ('train interactions', f'{split["train"]:,}'),
      ('validation interactions', f'{split["valid"]:,}'),
      ('test interactions', f'{split["test"]:,}'),
      ('train users / catalog', f'{split["train_users"]:,} / {split["catalog"]:,}'),
      ('dropped (cold items)', f'{split["dropped_cold_items"]:,}'),
  ]
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  split = prepare.SplitSettings(_Q_VALID.value, _Q_TEST.value, _MAX_EVAL.value)
  allow = None if _DOWNLOAD.value else False
  try:
    prepared = prepare.prepare(_DATASET.value, _DATA_DIR.value, split=split,
                               overrides=_overrides(), allow_download=allow, force=_FORCE.value)
  except (DataError, OSError) as e:
    if flags.FLAGS.verbosity >= 1:
      raise
    sys.exit(f'error: {e}')
  print(format_stats(prepared))


def run() -> None:
  """`app.run(main)`, then an exit that skips the interpreter's teardown: worker threads of
  Arrow's pools still alive then can abort it after the work is done ("terminate called
  without an active exception", exit -6; apache/arrow#39862), as this command once did in
  CI. Everything it writes is written and closed by then."""
  try:
    app.run(main)
    status = 0
  except SystemExit as done:
    status = done.code
  if isinstance(status, str):  # sys.exit('error: ...') prints its message at teardown
    print(status, file=sys.stderr)
    status = 1
  sys.stdout.flush()
  sys.stderr.flush()
  logging.shutdown()  # absl's handlers flushed
  os._exit(status or 0)


if __name__ == '__main__':
  run()
