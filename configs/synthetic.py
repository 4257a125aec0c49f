"""The embedded synthetic dataset (pka_jax.data.synthetic): the README's first command.

Sized to train PKA to a clear result in a few minutes on a laptop CPU.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.dataset = 'synthetic'
  config.maxlen = 50
  config.num_blocks = 2
  config.hidden_units = 64
  config.batch_size = 128
  config.learning_rate = 1e-3
  config.dropout = 0.2
  config.max_epochs = 60
  config.patience = 5
  config.log_every_steps = 10
  default.apply_variant(config, arg)
  return config
