"""The encoder's training pass with each block's second half by XLA against the Pallas
kernels (pka_jax/kernels/ffn.py), on the default device.

  python experiments/ffn_benchmark.py                       # ML-1M's PKA shape, bfloat16
  python experiments/ffn_benchmark.py --dtype=float32 --json=/tmp/ffn.json

A batch of left-padded sequences through the encoder with dropout, the weighted sum of its
outputs and the gradients with respect to every parameter, jitted; the two encoders differ
only in `ffn_impl`, so the difference in time is the second halves'. For each it prints the
time (median of single calls, and back to back) and its largest difference from XLA's in the
outputs and in the gradients, relative to each leaf's largest entry: on a GPU this is the
check that the Triton kernels compute the XLA path. Off a GPU the kernels run in Pallas's
interpreter, only with `--interpret` and at small shapes.
"""

import dataclasses

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import kernel_timing
from pka_jax.kernels import ffn as pallas_ffn
from pka_jax.model import encoder

_BATCH = flags.DEFINE_integer('batch', 256, 'Sequences.')
_MAXLEN = flags.DEFINE_integer('maxlen', 128, 'Positions a sequence.')
_WIDTH = flags.DEFINE_integer('width', 128, 'Hidden width d.')
_BLOCKS = flags.DEFINE_integer('blocks', 3, 'Blocks.')
_ITEMS = flags.DEFINE_integer('items', 3416, 'Items in the catalog.')
_FLAGS = kernel_timing.define_flags()


def model_config() -> encoder.ModelConfig:
  """ML-1M's tuned PKA model at the flags' shape."""
  return encoder.ModelConfig(
      num_items=_ITEMS.value, maxlen=_MAXLEN.value, num_blocks=_BLOCKS.value,
      hidden_units=_WIDTH.value, num_heads=1, dropout=0.2, position_mode='kernel',
      dtype=_FLAGS.dtype.value)


def inputs() -> jax.Array:
  """Sequences of every length from 1 to maxlen, left-padded with 0."""
  batch, maxlen = _BATCH.value, _MAXLEN.value
  lengths = 1 + jnp.arange(batch)[:, None] % maxlen
  position = jnp.arange(maxlen)[None, :]
  items = 1 + (position * 7919 + jnp.arange(batch)[:, None] * 104729) % _ITEMS.value
  return jnp.where(position >= maxlen - lengths, items, 0)


def gradients(impl: str):
  """The jitted outputs-and-gradients function of the encoder with `ffn_impl=impl`, and its
  arguments: the same parameters (initialised once) and inputs for both."""
  rows = _BATCH.value * _MAXLEN.value
  if impl == 'pallas' and not pallas_ffn.supports(rows, _WIDTH.value):
    raise app.UsageError(f'--batch={_BATCH.value} --maxlen={_MAXLEN.value} --width='
                         f'{_WIDTH.value}: the kernels take rows in blocks of 16 or 32 and a '
                         'width of a power of two from 16 to 128')
  config = dataclasses.replace(model_config(), ffn_impl=impl)
  model = encoder.Encoder(config)
  inputs_BxT = inputs()
  params = {'params': encoder.Encoder(model_config()).init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, inputs_BxT)['params']}
  weights = jnp.cos(jnp.arange(rows * _WIDTH.value)).reshape(*inputs_BxT.shape, _WIDTH.value)

  def total(params, inputs_BxT, weights):
    out = model.apply(params, inputs_BxT, rngs={'dropout': jax.random.key(2)})
    return jnp.sum(out.astype(jnp.float32) * weights), out

  return jax.jit(jax.value_and_grad(total, has_aux=True)), (params, inputs_BxT, weights)


def differences(out, reference) -> dict:
  """The outputs' and the gradients' largest differences, each relative to its leaf's largest
  entry (the worst leaf of the gradients)."""
  ((_, outputs), grads), ((_, ref_outputs), ref_grads) = out, reference

  def relative(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

  return {'outputs': relative(outputs, ref_outputs),
          'gradients': max(jax.tree.leaves(jax.tree.map(relative, grads, ref_grads)))}


def main(argv):
  del argv
  shape = {'batch': _BATCH.value, 'maxlen': _MAXLEN.value, 'width': _WIDTH.value,
           'blocks': _BLOCKS.value, 'items': _ITEMS.value, 'dtype': _FLAGS.dtype.value}
  kernel_timing.against_pallas('xla', shape, gradients, differences, _FLAGS)


if __name__ == '__main__':
  app.run(main)
