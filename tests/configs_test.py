"""Dataset configs: the published hyper-parameters, every model variant, loading by path."""

import importlib
import os
import subprocess
import sys

import pytest

from configs import default
from pka_jax.data import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET_CONFIGS = ('ml1m', 'beauty', 'yelp', 'gowalla', 'zvuk', 'yambda_likes',
                   'yambda_listens', 'ml100k', 'ml20m')
HYPER = ('num_blocks', 'hidden_units', 'learning_rate', 'batch_size', 'maxlen', 'dropout',
         'num_heads')


@pytest.mark.parametrize('name', DATASET_CONFIGS)
@pytest.mark.parametrize('model', sorted(default.MODEL_POSITIONS))
def test_every_model_variant(name, model):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config(f'model={model}')
  assert config.dataset == name and name in registry.DATASETS
  assert config.model == model
  assert config.position_mode == default.MODEL_POSITIONS[model]
  assert {k: config[k] for k in HYPER} == module.PER_MODEL[model]


@pytest.mark.parametrize('name', DATASET_CONFIGS)
def test_default_variant_is_pka(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.model == 'pka' and config.position_mode == 'kernel'


# docs/design.md §2: (blocks, hidden, lr, batch), all with maxlen 128, dropout 0.3, one head.
PUBLISHED = {
    ('ml1m', 'pka'): (3, 128, 1e-3, 256), ('ml1m', 'sasrec'): (3, 256, 3e-4, 256),
    ('ml1m', 'nope'): (3, 256, 3e-4, 256), ('ml1m', 'rope'): (3, 128, 3e-4, 128),
    ('ml1m', 'cope'): (3, 256, 3e-4, 256),
    ('beauty', 'pka'): (2, 128, 3e-4, 128), ('beauty', 'sasrec'): (3, 128, 3e-4, 256),
    ('beauty', 'nope'): (2, 256, 3e-4, 128), ('beauty', 'rope'): (2, 64, 1e-3, 256),
    ('beauty', 'cope'): (1, 128, 3e-4, 256),
}


@pytest.mark.parametrize('name, model', sorted(PUBLISHED))
def test_published_hyper_parameters(name, model):
  config = importlib.import_module(f'configs.{name}').get_config(f'model={model}')
  got = (config.num_blocks, config.hidden_units, config.learning_rate, config.batch_size)
  assert got == PUBLISHED[name, model]
  assert (config.maxlen, config.dropout, config.num_heads) == (128, 0.3, 1)


_LOAD_BY_PATH = """
import sys
from absl import flags
from ml_collections import config_flags
config_flags.DEFINE_config_file('config', None, 'config', lock_config=True)
flags.FLAGS(['prog', '--config=' + sys.argv[1]])
config = flags.FLAGS.config
print(config.dataset, config.model, config.hidden_units)
"""


def test_loads_by_path_from_another_directory(tmp_path):
  """As `--config=configs/yelp.py:model=rope` does, with the repository not on sys.path."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  path = os.path.join(REPO, 'configs', 'yelp.py')
  result = subprocess.run([sys.executable, '-c', _LOAD_BY_PATH, f'{path}:model=rope'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ['yelp', 'rope', '64']


@pytest.mark.parametrize('layout', sorted(default.KERNEL_LAYOUTS))
def test_kernel_ablations_build_models(layout):
  from pka_jax.model.encoder import ModelConfig
  config = importlib.import_module('configs.ml1m').get_config(f'model=pka,kernel={layout}')
  model_config = ModelConfig.from_config(config, num_items=10)
  sides = tuple(model_config.kernel_kind(s) for s in 'qkv')
  assert sides == default.KERNEL_LAYOUTS[layout][:3]
  assert config.hidden_units == 128  # PKA's tuned width still applies


def test_bad_variants_are_named():
  with pytest.raises(ValueError, match='needs model=pka'):
    default.get_config('model=sasrec,kernel=k_only')
  with pytest.raises(ValueError, match='expected one of'):
    default.get_config('model=pka,kernel=diagonal')
  with pytest.raises(ValueError, match='expected model=NAME or kernel=LAYOUT'):
    default.get_config('lr=1')


# The authors' search (docs/design.md §2 and docs/tuning.md): every model, every dataset.
AUTHORS_SPACE = {'batch_size': (128, 256), 'num_blocks': (1, 2, 3),
                 'hidden_units': (64, 128, 256), 'learning_rate': (3e-4, 1e-3),
                 'dropout': (0.1, 0.3)}


@pytest.mark.parametrize('name', DATASET_CONFIGS)
@pytest.mark.parametrize('model', ['pka', 'sasrec'])
def test_the_search_space_is_the_authors(name, model):
  config = importlib.import_module(f'configs.{name}').get_config(f'model={model}')
  space = {field: tuple(choices) for field, choices in config.search_space.items()}
  # Sessions of thousands of listens: the authors searched batches of 32 there.
  batches = (32,) if name in ('zvuk', 'yambda_listens') else (128, 256)
  assert space == {**AUTHORS_SPACE, 'batch_size': batches}
