"""The paper's tables over seeds: datasets × models × PKA kernel layouts × seeds, resumable.

  python experiments/reproduce.py --config=configs/ml1m.py --models=pka,sasrec,nope \
      --seeds=3 --root=runs/paper
  python experiments/reproduce.py --config=configs/synthetic.py --models=pka,sasrec,nope \
      --kernels=toeplitz_toeplitz,full_toeplitz,toeplitz_full_shared,k_only,v_only,q_and_k \
      --seeds=3 --root=runs/paper
  python experiments/reproduce.py --config=configs/test.py --seeds=2 --root=runs/grid_test \
      --override=max_epochs=1

Also `python -m experiments.reproduce` with the same flags: it imports only pka_jax and
configs, so it runs as a file too. Each run trains in
`<root>/<dataset>/<model>[-<layout>]/seed<k>` (pka_jax/paper/grid.py). Rerunning the command
reads finished runs back and resumes interrupted ones. `<root>/runs.csv` (one row per run) and
`<root>/table.md` (mean ± 95% interval over seeds, per dataset) are rewritten after every run.
Figures of the grid: `python -m pka_jax.figures --figure=all --root=<root>`.
"""

import functools
import shlex
import sys

from absl import app
from absl import flags

from pka_jax import config_check
from pka_jax import jobs
from pka_jax import sharding
from pka_jax.paper import grid
from pka_jax.training import checkpoint

flags.DEFINE_list('config', ['configs/synthetic.py'], 'Config files, one per dataset.')
flags.DEFINE_list('models', ['pka', 'sasrec', 'nope'], 'Models (configs/default.py).')
flags.DEFINE_list('kernels', [], 'PKA kernel layouts (configs/default.py KERNEL_LAYOUTS).')
flags.DEFINE_integer('seeds', 3, 'Seeds 0 .. seeds - 1 of every cell.')
flags.DEFINE_string('root', 'runs/paper', 'Directory of the grid.')
flags.DEFINE_multi_string('override', [], 'FIELD=VALUE set in every config, as '
                          '--config.FIELD=VALUE would (e.g. max_epochs=1).')
flags.DEFINE_integer('cpu_devices', None, 'Split a CPU into this many XLA devices (0: one per '
                     'core, the most that divide every run\'s batch sizes), to train and '
                     'evaluate on. Default: as pka_jax.main, one per core, evaluating on all '
                     'and training on one.', lower_bound=0)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  checkpoint.quiet_orbax_logging()
  overrides = [grid.parse_override(text) for text in FLAGS.override]
  cells = grid.cells(FLAGS.config, FLAGS.models, FLAGS.kernels)
  specs = grid.specs(cells, range(FLAGS.seeds), FLAGS.root, overrides)
  configs = [spec.config() for spec in specs]
  sharding.split_cpu(FLAGS.cpu_devices or config_check.cpu_devices_for(configs))
  command = ' '.join(['python', 'experiments/reproduce.py', *map(shlex.quote, sys.argv[1:])])
  train_fn = functools.partial(jobs.train,
                               train_devices=sharding.devices_to_train(FLAGS.cpu_devices))
  grid.run_grid(specs, FLAGS.root, command, train_fn)
  with open(f'{FLAGS.root}/table.md') as f:
    print(f.read())


if __name__ == '__main__':
  app.run(main)
