"""Compares the fused attention implementations with the plain path on this backend.

  python -m experiments.kernels.attention_check --config=configs/ml1m.py --synthetic_items=3416
  python -m experiments.kernels.attention_check --config=configs/ml1m.py --config.dtype=bfloat16

For each position mode that can use jax.nn.dot_product_attention (all but CoPE), builds the
encoder once, then scores the same left-padded batch with `attention_impl` plain and with each
fused implementation this backend offers ('xla' everywhere, 'cudnn' on GPU): prints the
largest difference of the hidden states at real positions (relative to their largest
magnitude) and of the newest position's scores, and the time of a scoring pass for each.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from configs import default
from pka_jax import config_check
from pka_jax.model import encoder
from pka_jax.model.encoder import Encoder

config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'Config file.')
_ITEMS = flags.DEFINE_integer('synthetic_items', 1000, 'Catalog size of the random batch.')
_MODELS = flags.DEFINE_list('models', ['pka', 'sasrec', 'nope', 'rope', 'all_ape'], 'Models.')
FLAGS = flags.FLAGS


def random_batch(config, num_items: int) -> jax.Array:
  rng = np.random.default_rng(0)
  batch, size = config_check.eval_batch_size_for(config), config.maxlen
  items = rng.integers(1, num_items + 1, (batch, size))
  lengths = rng.integers(1, size + 1, batch)
  return jnp.asarray(np.where(np.arange(size)[None] >= size - lengths[:, None], items, 0),
                     jnp.int32)


def timed(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def main(argv):
  del argv
  impls = ['xla'] + (['cudnn'] if jax.default_backend() == 'gpu' else [])
  print(f'{jax.devices()[0].device_kind}, jax {jax.__version__}, dtype {FLAGS.config.dtype}')
  for model_name in _MODELS.value:
    config = FLAGS.config.copy_and_resolve_references()
    default.apply_variant(config, f'model={model_name}')
    inputs = random_batch(config, _ITEMS.value)
    real = np.asarray(inputs != 0)
    outputs = {}
    for impl in ['plain'] + impls:
      config.attention_impl = impl
      model = encoder.create_model(config, _ITEMS.value, deterministic=True)
      if impl == 'plain':
        params = jax.jit(model.init)(jax.random.key(0), inputs[:1])['params']
      hidden = jax.jit(lambda p, x, m=model: m.apply({'params': p}, x))
      score = jax.jit(lambda p, x, m=model: m.apply({'params': p}, x, method=Encoder.score_last))
      outputs[impl] = (np.asarray(hidden(params, inputs), np.float32),
                       np.asarray(score(params, inputs), np.float32), timed(score, params, inputs))
    plain_hidden, plain_scores, plain_seconds = outputs['plain']
    line = f'{model_name:8s} plain {plain_seconds * 1e3:7.2f} ms'
    for impl in impls:
      hidden, scores, seconds = outputs[impl]
      hidden_error = np.abs(hidden - plain_hidden)[real].max() / np.abs(plain_hidden[real]).max()
      score_error = np.abs(scores - plain_scores)[:, 1:].max() / np.abs(plain_scores[:, 1:]).max()
      line += (f' | {impl} {seconds * 1e3:7.2f} ms, hidden {hidden_error:.1e}, '
               f'scores {score_error:.1e} (relative)')
    print(line)


if __name__ == '__main__':
  app.run(main)
