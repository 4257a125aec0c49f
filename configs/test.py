"""A tiny configuration for tests on CPU: a small synthetic catalog and a small model."""

import ml_collections

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.dataset = 'synthetic'
  config.synthetic.num_users = 200
  config.synthetic.num_items = 60
  config.synthetic.min_length = 8
  config.synthetic.max_length = 20
  config.maxlen = 16
  config.num_blocks = 2
  config.hidden_units = 16
  config.num_heads = 2
  config.batch_size = 32
  config.dropout = 0.1
  config.max_epochs = 3
  config.patience = 2
  config.log_every_steps = 2
  config.eval_batch_size = 64
  # A tiny search (python -m pka_jax.tune) of four points.
  config.search_space = ml_collections.ConfigDict(
      {'learning_rate': (1e-3, 1e-2), 'dropout': (0.0, 0.1)})
  default.apply_variant(config, arg)
  return config
