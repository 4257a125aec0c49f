"""Trains several position schemes with the same data, seeds and budget; prints test metrics.

  python experiments/compare_positions.py --config=configs/synthetic.py \
      --models=pka,nope,sasrec --workdir=runs/compare_synthetic
  python experiments/compare_positions.py --models= \
      --kernels=toeplitz_full,toeplitz_toeplitz,full_toeplitz --workdir=runs/ablation

Each model trains in `<workdir>/<model>` (reruns resume or reuse finished runs). A dataset
config's per-model hyper-parameters apply; on the synthetic config all models share them.
"""

import importlib.util
import os

from absl import app
from absl import flags
from absl import logging

from pka_jax import report
from pka_jax import train

flags.DEFINE_string('config', 'configs/synthetic.py', 'Config file (its get_config(arg)).')
flags.DEFINE_list('models', ['pka', 'nope', 'sasrec'], 'Models to compare.')
flags.DEFINE_list('kernels', [], 'PKA kernel layouts to compare (configs/default.py).')
flags.DEFINE_string('workdir', 'runs/compare', 'Parent directory of the per-model runs.')
FLAGS = flags.FLAGS


def load_config(path: str, variant: str):
  spec = importlib.util.spec_from_file_location('experiment_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def main(argv):
  del argv
  variants = {m: f'model={m}' for m in FLAGS.models}
  variants.update({k: f'model=pka,kernel={k}' for k in FLAGS.kernels})
  results = {}
  for name, variant in variants.items():
    logging.info('Training %s (%s)', name, variant)
    results[name] = train.train_and_evaluate(
        load_config(FLAGS.config, variant), os.path.join(FLAGS.workdir, name))
  print(report.results_table(results))


if __name__ == '__main__':
  app.run(main)
