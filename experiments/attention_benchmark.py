"""PKA's training attention alone, forward and backward: the plain path (XLA) against the
Pallas kernel (pka_jax/kernels/attention.py), on the default device.

  python experiments/attention_benchmark.py                  # ML-1M's PKA shape, bfloat16
  python experiments/attention_benchmark.py --dtype=float32 --json=/tmp/attention.json

One attention layer as the encoder trains it (dropout on the weights, the Toeplitz kernel on
the logits and the full kernel on the weights, padding keys masked), its value and the
gradients of its parameters, inputs and kernels, jitted. For each implementation it prints
the time (median of single calls, and back to back) and its largest difference from the plain
path in the value and in each gradient, relative to that gradient's largest entry: on a GPU
this is the check that the Triton kernels compute what the plain path does, masks included.
Off a GPU the Pallas kernel runs in Pallas's interpreter, only with `--interpret` and at
small shapes.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import kernel_timing
from pka_jax.model import attention

_BATCH = flags.DEFINE_integer('batch', 256, 'Sequences.')
_MAXLEN = flags.DEFINE_integer('maxlen', 128, 'Positions a sequence (queries and keys).')
_WIDTH = flags.DEFINE_integer('width', 128, 'Hidden width d.')
_HEADS = flags.DEFINE_integer('heads', 1, 'Attention heads.')
_DROPOUT = flags.DEFINE_float('dropout', 0.3, 'Dropout rate on the attention weights.')
_FLAGS = kernel_timing.define_flags()


def layer_gradients(impl: str, dtype):
  """The jitted value-and-gradients function of one training attention layer, and its
  arguments."""
  batch, size, width = _BATCH.value, _MAXLEN.value, _WIDTH.value
  module = attention.CausalSelfAttention(num_heads=_HEADS.value, dropout=_DROPOUT.value,
                                         deterministic=False, impl=impl, dtype=dtype)
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (batch, size, width))
  # Histories of every length: some rows start with many padding keys.
  valid = jnp.arange(size)[None, :] >= (jnp.arange(batch) % size)[:, None] // 2
  lower = lambda key: jnp.tril(jax.random.normal(key, (size, size))) * 0.1 + jnp.eye(size)
  tk, fv = lower(keys[1]), lower(keys[2])
  params = module.init({'params': keys[3], 'dropout': keys[4]}, x, x, x, valid,
                       k_kernel_TxT=tk, v_kernel_TxT=fv)
  weights = jnp.cos(jnp.arange(x.size)).reshape(x.shape)

  # Arguments, not constants of the program: XLA would spend seconds folding them.
  def total(params, x, tk, fv, valid, weights, rng):
    out = module.apply(params, x, x, x, valid, k_kernel_TxT=tk, v_kernel_TxT=fv,
                       rngs={'dropout': rng})
    return jnp.sum(out.astype(jnp.float32) * weights)

  return (jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2, 3))),
          (params, x, tk, fv, valid, weights, keys[5]))


def differences(out, reference) -> dict:
  """The value's relative difference, and the largest of the gradients' differences, each
  relative to its gradient's largest entry (the key bias, whose true gradient is zero and
  which holds rounding noise only, left out)."""
  (value, grads), (ref_value, ref_grads) = out, reference
  worst = 0.0
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref_grads)[0],
                          jax.tree.leaves(grads)):
    if "['key']['bias']" in jax.tree_util.keystr(path):
      continue
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)))
  return {'value': abs(float(value) - float(ref_value)) / abs(float(ref_value)),
          'gradients': worst}


def main(argv):
  del argv
  build = lambda impl: layer_gradients(impl, jnp.dtype(_FLAGS.dtype.value))
  shape = {'batch': _BATCH.value, 'maxlen': _MAXLEN.value, 'width': _WIDTH.value,
           'heads': _HEADS.value, 'dropout': _DROPOUT.value, 'dtype': _FLAGS.dtype.value}
  kernel_timing.against_pallas('plain', shape, build, differences, _FLAGS)


if __name__ == '__main__':
  app.run(main)
