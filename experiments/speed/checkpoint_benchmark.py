"""Times saving and restoring a config's train state, replicated over one process's devices,
with orbax's replica-parallel writing and with the whole-array writing pka_jax uses in one
process (pka_jax.training.checkpoint.save_replicas_whole_in_one_process).

  python -m experiments.speed.checkpoint_benchmark --config=configs/test.py --devices=8
  python -m experiments.speed.checkpoint_benchmark --config=configs/ml1m.py \
      --config.dataset=synthetic --config.synthetic.num_items=3416 --devices=8

Each way saves (and waits for) `--repeats` checkpoints as a run does (the state, the
progress and the config, through pka_jax.training.checkpoint), then restores the last one as
many times, alternating the two ways `--rounds` times; it prints the median seconds per save
and per restore of each way and their ratio. The state is the freshly initialised one: its
shapes, not its values, set the cost.
"""

import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pka_jax.training import checkpoint
from pka_jax.training.loop import Trainer

config_flags.DEFINE_config_file('config', 'configs/test.py', 'Config file.')
_DEVICES = flags.DEFINE_integer('devices', 8, 'CPU devices the state is replicated over.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Saves, then restores, timed per way and round.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternations of the two ways.')


def time_way(run: Trainer, root: str, replica_parallel: bool) -> tuple[float, float]:
  """Median seconds per save and per restore of the run's state, as the run saves it, under
  `root`."""
  checkpoint.use_array_handler(replica_parallel)
  mngr = checkpoint.manager(root)
  first = (mngr.latest_step() or 0) + 1
  saves, restores = [], []
  for step in range(first, first + _REPEATS.value):
    start = time.perf_counter()
    checkpoint.save(mngr, step, state=run.state, progress={'epoch': 0}, config=run.config)
    checkpoint.wait(mngr)
    saves.append(time.perf_counter() - start)
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(checkpoint.restore(mngr, mngr.latest_step(), run.state)[0])
    restores.append(time.perf_counter() - start)
  mngr.close()
  return statistics.median(saves), statistics.median(restores)


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  jax.config.update('jax_num_cpu_devices', _DEVICES.value)
  with tempfile.TemporaryDirectory(prefix='pka_jax_checkpoint_benchmark_') as scratch:
    config = flags.FLAGS.config
    config.data_dir = os.path.join(scratch, 'data')
    run = Trainer.create(config, os.path.join(scratch, 'run'), train_devices=_DEVICES.value)
    state = run.state
    leaves = jax.tree.leaves(state)
    print(f'{len(leaves)} arrays, {sum(a.nbytes for a in leaves) / 2**20:.1f} MiB, replicated '
          f'over {len(state.step.sharding.device_set)} of {jax.device_count()} '
          f'{jax.default_backend()} devices')
    figures = {True: [], False: []}
    for _ in range(_ROUNDS.value):
      for replica_parallel in (True, False):
        figures[replica_parallel].append(time_way(
            run, os.path.join(scratch, f'parallel_{replica_parallel}'), replica_parallel))
    for replica_parallel, name in ((True, 'replica-parallel (orbax default)'),
                                   (False, 'whole arrays (pka_jax, one process)')):
      save, restore = (statistics.median(f[i] for f in figures[replica_parallel])
                       for i in (0, 1))
      print(f'{name:38s} save {save:.3f} s   restore {restore:.3f} s')
    ratios = [p[0] / w[0] for p, w in zip(figures[True], figures[False])]
    print(f'save time, replica-parallel / whole: {statistics.median(ratios):.2f}x '
          f'(per round: {", ".join(f"{r:.2f}" for r in ratios)})')


if __name__ == '__main__':
  app.run(main)
