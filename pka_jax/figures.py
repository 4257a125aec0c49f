"""Command line: the paper's figures from trained runs (pka_jax/paper/figures.py).

  python -m pka_jax.figures --figure=all --root=runs/paper --dataset=synthetic --out=docs
  python -m pka_jax.figures --figure=kernels --workdirs=runs/paper/synthetic/pka/seed0 \
      --out=docs/kernels.png
"""

import os
import shlex
import sys

from absl import app
from absl import flags

from pka_jax import cli
from pka_jax.paper.figures import (all_figures, attention_figure, bars_figure, curves_figure,
                                   kernels_figure, read_runs_csv)

FIGURES = ('kernels', 'attention', 'curves', 'bars', 'all')
flags.DEFINE_enum('figure', 'all', FIGURES, 'Which figure.')
flags.DEFINE_list('workdirs', [], 'Run directories (kernels: the first; attention, curves).')
flags.DEFINE_list('labels', [], 'A label per workdir (default: the model; equal labels are '
                  'averaged by curves).')
flags.DEFINE_string('root', None, 'Grid root of experiments/reproduce.py (bars, all).')
flags.DEFINE_string('dataset', None, 'Dataset of the grid for --figure=all (default: every).')
flags.DEFINE_string('out', 'docs', 'Output PNG, or a directory for --figure=all.')
flags.DEFINE_integer('max_sequences', 4096, 'Test windows averaged by the attention maps.')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  command = ' '.join(['python -m pka_jax.figures', *map(shlex.quote, sys.argv[1:])])
  labels = FLAGS.labels or None
  if FLAGS.figure in ('bars', 'all') and not FLAGS.root:
    raise app.UsageError(f'--figure={FLAGS.figure} needs --root')
  if FLAGS.figure in ('kernels', 'attention', 'curves') and not FLAGS.workdirs:
    raise app.UsageError(f'--figure={FLAGS.figure} needs --workdirs')
  if FLAGS.figure == 'kernels':
    kernels_figure(FLAGS.workdirs[0], FLAGS.out, command)
  elif FLAGS.figure == 'attention':
    attention_figure(FLAGS.workdirs, FLAGS.out, command, labels, FLAGS.max_sequences)
  elif FLAGS.figure == 'curves':
    curves_figure(FLAGS.workdirs, FLAGS.out, command, labels)
  elif FLAGS.figure == 'bars':
    bars_figure(read_runs_csv(os.path.join(FLAGS.root, 'runs.csv')), FLAGS.out, command)
  else:
    for path in all_figures(FLAGS.root, FLAGS.out, command, FLAGS.dataset,
                            FLAGS.max_sequences):
      print(path)


if __name__ == '__main__':
  cli.run(main)
