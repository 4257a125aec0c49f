"""Measures compile time and steady-state training throughput of a config's train step.

  python experiments/train_throughput.py --config=configs/synthetic.py --steps=50
  python experiments/train_throughput.py --config=configs/ml1m.py --synthetic_items=3706

Real-dataset configs can run without their data: `--synthetic_items=N` swaps in the
synthetic generator with an N-item catalog, so only the model and batch shapes matter.
"""

import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from pka_jax import train

config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'Config file.')
flags.DEFINE_integer('steps', 50, 'Timed steps after the compiling one.')
flags.DEFINE_integer('synthetic_items', 0, 'Replace the dataset by synthetic data of this size.')
flags.DEFINE_string('workdir', '/tmp/pka_jax_throughput', 'Scratch workdir.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.synthetic_items:
    config.dataset = 'synthetic'
    config.synthetic.num_items = FLAGS.synthetic_items
    config.synthetic.num_users = max(config.batch_size * 4, 2000)
    config.synthetic.max_length = min(config.maxlen + 1, FLAGS.synthetic_items - 1)
    config.synthetic.min_length = config.synthetic.max_length // 2
  run = train.Run(config, FLAGS.workdir)
  batches = []
  while len(batches) < FLAGS.steps + 1:
    batches.extend(run._global_batch(b) for b in run.inputs.epoch(len(batches)))
  start = time.perf_counter()
  run.state, metrics = run.step_fn(run.state, batches[0], run.dropout_rng)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  for batch in batches[1:FLAGS.steps + 1]:
    run.state, metrics = run.step_fn(run.state, batch, run.dropout_rng)
  jax.block_until_ready(metrics)
  step_seconds = (time.perf_counter() - start) / FLAGS.steps
  print(f'devices {jax.devices()}')
  print(f'model {config.model}: {config.num_blocks} blocks, d={config.hidden_units}, '
        f'T={config.maxlen}, batch {config.batch_size}, {run.dataset.num_items} items, '
        f'ce_block_size {config.ce_block_size}')
  print(f'first step (compile + run) {compile_seconds:.1f} s; '
        f'{step_seconds * 1000:.1f} ms/step; {config.batch_size / step_seconds:,.0f} sequences/s')


if __name__ == '__main__':
  app.run(main)
