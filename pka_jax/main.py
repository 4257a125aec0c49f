"""Command line: train and test a model, or evaluate the best checkpoint of a workdir.

  python -m pka_jax.main --config=configs/synthetic.py --workdir=runs/synthetic
  python -m pka_jax.main --config=configs/ml1m.py:model=sasrec --workdir=runs/ml1m_sasrec
  python -m pka_jax.main --config=configs/synthetic.py --workdir=runs/synthetic --mode=eval
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pka_jax import checkpoint
from pka_jax import config_check
from pka_jax import faults
from pka_jax import report
from pka_jax import train
from pka_jax.data.errors import DataError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                  'train: train (or resume) then test the best; eval: test the best checkpoint.')
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record: std_logging.LogRecord) -> bool:
  """Orbax logs every checkpoint step at INFO; keep its warnings, drop the rest."""
  return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


# Failures a user can act on: one line on stderr and a non-zero exit, no traceback (unless
# --verbosity=1 or more asks for it).
USER_ERRORS = (DataError, FileNotFoundError, train.WorkdirMismatchError, train.WorkdirError,
               config_check.ConfigError, faults.NonFiniteLoss, checkpoint.CheckpointError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  logging.info('JAX devices: %s (%d processes)', jax.devices(), jax.process_count())
  run = train.train_and_evaluate if FLAGS.mode == 'train' else train.evaluate_checkpoint
  try:
    results = run(FLAGS.config, FLAGS.workdir)
  except (faults.Preempted, *USER_ERRORS) as error:
    if FLAGS.verbosity >= 1:
      raise
    preempted = isinstance(error, faults.Preempted)
    print(error if preempted else f'error: {error}', file=sys.stderr)
    sys.exit(faults.PREEMPTED_EXIT_STATUS if preempted else 1)
  if jax.process_index() == 0:
    print(report.results_table({FLAGS.config.model: results}))


if __name__ == '__main__':
  app.run(main)
