"""Command line: train and test a model, or evaluate the best checkpoint of a workdir.

  python -m pka_jax.main --config=configs/synthetic.py --workdir=runs/synthetic
  python -m pka_jax.main --config=configs/ml1m.py:model=sasrec --workdir=runs/ml1m_sasrec
  python -m pka_jax.main --config=configs/synthetic.py --workdir=runs/synthetic --mode=eval
  # On every worker of a Cloud TPU slice (the runtime finds its peers), the workdir on a disk
  # every worker sees (NFS, or a bucket mounted with gcsfuse: not a gs:// URL):
  python -m pka_jax.main --config=configs/ml1m.py --workdir=/mnt/bucket/ml1m --distributed
  # Elsewhere, process i of n:
  python -m pka_jax.main ... --coordinator_address=host0:1234 --num_processes=n --process_id=i
"""

from absl import flags
from absl import logging
from ml_collections import config_flags

# JAX and the rest load in main(), once the flags are parsed: a mistake in them is reported
# in a fraction of a second instead of after two seconds of imports.
from pka_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                  'train: train (or resume) then test the best; eval: test the best checkpoint.')
flags.DEFINE_bool('distributed', False, 'Join the other processes of a multi-host run '
                  '(found automatically on Cloud TPU, SLURM and GKE; else the flags below).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (implies --distributed).')
flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')
flags.DEFINE_integer('cpu_devices', None, 'Split a CPU into this many XLA devices, data-'
                     'parallel (0: one per core, the most that divide the batch sizes), to '
                     'train and evaluate on. Default: one per core on one host, evaluating '
                     'on all and training on one (faster); where XLA_FLAGS or '
                     'JAX_NUM_CPU_DEVICES already split it, that split, training on all. No '
                     'effect on an accelerator.', lower_bound=0)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}')
  with cli.importing():
    # pylint: disable=g-import-not-at-top
    import jax
    from pka_jax import config_check
    from pka_jax import jobs
    from pka_jax import sharding
    from pka_jax.data.errors import DataError
    from pka_jax.evaluation import report
    from pka_jax.training import checkpoint
    from pka_jax.training import faults
    from pka_jax.training import workdir as workdir_lib
    # pylint: enable=g-import-not-at-top
  # Failures a user can act on: one line on stderr and a non-zero exit, no traceback (unless
  # --verbosity=1 or more asks for it).
  user_errors = (DataError, FileNotFoundError, workdir_lib.WorkdirMismatchError,
                 workdir_lib.WorkdirError, config_check.ConfigError, faults.NonFiniteLoss,
                 checkpoint.CheckpointError)
  checkpoint.quiet_orbax_logging(tracebacks=FLAGS.verbosity >= 1)
  distributed = bool(FLAGS.distributed or FLAGS.coordinator_address)
  # Rankings do not depend on the split, and evaluation gains from it; training by default
  # keeps one device of it. A split the user made stays.
  cpu_devices = cli.split_cpu(FLAGS.cpu_devices, [FLAGS.config], distributed=distributed)
  if distributed:
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
  logging.info('%s', sharding.describe_process())
  run = jobs.train if FLAGS.mode == 'train' else jobs.evaluate
  with cli.reported_failures(user_errors):
    results = run(FLAGS.config, FLAGS.workdir,
                  train_devices=sharding.devices_to_train(cpu_devices))
  if jax.process_index() == 0:
    print(report.results_table({FLAGS.config.model: results}))


if __name__ == '__main__':
  cli.run(main)
