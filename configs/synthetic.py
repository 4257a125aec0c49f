"""The embedded synthetic dataset (pka_jax.data.synthetic): the README's first command.

Sized to train PKA to a clear result in a few minutes on a laptop CPU.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.dataset = 'synthetic'
  config.maxlen = 32  # histories hold 20-60 items; the rule looks at most 5 back
  config.num_blocks = 2
  config.hidden_units = 48
  # Small batches and a higher rate than the paper's: more updates per CPU second. The full
  # kernel's off-diagonal entries start near 0 and must grow to weigh like the diagonal.
  config.batch_size = 64
  config.learning_rate = 3e-3
  config.dropout = 0.2
  config.max_epochs = 40
  config.patience = 10  # docs/design.md §2; within 40 epochs the synthetic runs never stop early
  config.log_every_steps = 10
  default.apply_variant(config, arg)
  return config
