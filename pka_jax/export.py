"""Command line: the trained scorer as a `jax.export` artefact (pka_jax/serving/export.py).

  python -m pka_jax.export --workdir=runs/synthetic --out=runs/synthetic/export --k=10
"""

from absl import flags
from absl import logging

from pka_jax import cli
from pka_jax.data.errors import DataError
from pka_jax.serving import export
from pka_jax.serving.recommender import Recommender

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A training run directory.')
flags.DEFINE_string('out', None, 'Directory to write scorer.jax, item_ids.npy and meta.json to.')
flags.DEFINE_integer('k', 10, 'Items per list.', lower_bound=1)
flags.DEFINE_string('step', 'best', "Checkpoint: 'best', 'latest' or a step number.")
flags.DEFINE_list('platforms', ['cpu'], 'Platforms to lower for (cpu, cuda, rocm, tpu); the '
                  'artefact runs on any of them.')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}')
  try:
    recommender = Recommender.from_workdir(FLAGS.workdir, FLAGS.step)
    export.write_export(recommender, FLAGS.out, FLAGS.k, tuple(FLAGS.platforms))
  except (DataError, FileNotFoundError, ValueError) as error:
    cli.fail(str(error))
  logging.info('Wrote %s (step %d, k=%d)', FLAGS.out, recommender.step, FLAGS.k)


if __name__ == '__main__':
  cli.run(main)
