"""LayerNorm alone, forward and backward: flax's (XLA) against the Pallas kernels
(pka_jax/kernels/layer_norm.py), on the default device.

  python experiments/layer_norm_benchmark.py                  # ML-1M's rows, bfloat16
  python experiments/layer_norm_benchmark.py --dtype=float32 --json=/tmp/layer_norm.json

The rows of a training step (batch × maxlen, width d) normalised, their weighted sum's value
and its gradients with respect to the rows, the scale and the bias, jitted. For each
implementation it prints the time (median of single calls, and back to back) and its largest
difference from flax's in the value and in each gradient, relative to that gradient's largest
entry: on a GPU this is the check that the Triton kernels compute flax's LayerNorm. Off a GPU
the kernels run in Pallas's interpreter, only with `--interpret` and at small shapes.
"""

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import kernel_timing
from pka_jax.kernels import layer_norm as pallas_layer_norm
from pka_jax.model import encoder

_ROWS = flags.DEFINE_integer('rows', 256 * 128, 'Rows (batch × maxlen).')
_WIDTH = flags.DEFINE_integer('width', 128, 'Hidden width d.')
_FLAGS = kernel_timing.define_flags()


def normalise(impl: str):
  """`(rows, scale, bias) -> normalised rows` of flax's LayerNorm or the Pallas kernels."""
  if impl == 'xla':
    return lambda x, scale, bias: nn.LayerNorm(epsilon=encoder.LN_EPSILON, dtype=x.dtype).apply(
        {'params': {'scale': scale, 'bias': bias}}, x)
  rows = _ROWS.value
  if not pallas_layer_norm.supports(rows, _WIDTH.value):
    raise app.UsageError(f'--rows={rows} --width={_WIDTH.value}: the kernels take rows in '
                         'blocks of 16 to 64 and a width of a power of two of at least 16')
  options = pallas_layer_norm.Options(encoder.LN_EPSILON,
                                      pallas_layer_norm.block_rows_for(rows),
                                      interpret=jax.default_backend() != 'gpu')
  return lambda x, scale, bias: pallas_layer_norm.layer_norm(x, scale, bias, options)


def gradients(impl: str, dtype):
  """The jitted value-and-gradients function, and its arguments: rows of several offsets
  and spreads, a scale and a bias away from their starting values."""
  keys = jax.random.split(jax.random.key(0), 3)
  rows, width = _ROWS.value, _WIDTH.value
  x = (jax.random.normal(keys[0], (rows, width)) * jnp.linspace(0.5, 2, rows)[:, None]
       + jnp.linspace(-1, 1, rows)[:, None]).astype(dtype)
  scale = 1 + 0.2 * jax.random.normal(keys[1], (width,))
  bias = 0.2 * jax.random.normal(keys[2], (width,))
  weights = jnp.cos(jnp.arange(rows * width)).reshape(rows, width)
  layer_norm = normalise(impl)

  def total(x, scale, bias, weights):
    return jnp.sum(layer_norm(x, scale, bias).astype(jnp.float32) * weights)

  return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2))), (x, scale, bias, weights)


def differences(out, reference) -> dict:
  """The value's relative difference, and each gradient's largest difference relative to
  its largest entry."""
  (value, grads), (ref_value, ref_grads) = out, reference
  found = {'value': abs(float(value) - float(ref_value)) / abs(float(ref_value))}
  for name, a, b in zip(('rows', 'scale', 'bias'), ref_grads, grads):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    found[name] = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
  return found


def main(argv):
  del argv
  build = lambda impl: gradients(impl, jnp.dtype(_FLAGS.dtype.value))
  shape = {'rows': _ROWS.value, 'width': _WIDTH.value, 'dtype': _FLAGS.dtype.value}
  kernel_timing.against_pallas('xla', shape, build, differences, _FLAGS)


if __name__ == '__main__':
  app.run(main)
