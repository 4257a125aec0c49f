"""The Pallas LayerNorm is flax's (Pallas's interpreter on the CPU: same values and gradients,
same parameters) and lowers to one Triton kernel forward and one backward for a GPU."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pka_jax.kernels import layer_norm as pallas_layer_norm
from pka_jax.model import encoder

ROWS, WIDTH = 48, 32  # three blocks of 16


def loss_and_grads(layer_norm, dtype):
  """A weighted sum of the normalised rows, and its gradients with respect to the rows, the
  scale and the bias; rows of several spreads and offsets. (Far from zero, the variance as
  `mean(x²) - mean²` loses digits in both, each its own: flax differentiates that formula,
  the kernel uses the analytic gradient.)"""
  keys = jax.random.split(jax.random.key(0), 4)
  x = (jax.random.normal(keys[0], (ROWS, WIDTH)) * jnp.linspace(0.5, 3, ROWS)[:, None]
       + jnp.linspace(-2, 2, ROWS)[:, None]).astype(dtype)
  scale = 1 + 0.3 * jax.random.normal(keys[1], (WIDTH,))
  bias = 0.3 * jax.random.normal(keys[2], (WIDTH,))
  weights = jnp.cos(jnp.arange(ROWS * WIDTH)).reshape(ROWS, WIDTH)
  total = lambda x, s, b: jnp.sum(layer_norm(x, s, b).astype(jnp.float32) * weights)
  return jax.value_and_grad(total, argnums=(0, 1, 2))(x, scale, bias)


def flax_layer_norm(dtype):
  module = nn.LayerNorm(epsilon=encoder.LN_EPSILON, dtype=dtype)
  return lambda x, s, b: module.apply({'params': {'scale': s, 'bias': b}}, x)


def pallas_kernels(block_rows=16):
  options = pallas_layer_norm.Options(encoder.LN_EPSILON, block_rows, interpret=True)
  return lambda x, s, b: pallas_layer_norm.layer_norm(x, s, b, options)


def assert_close(got, want, rtol):
  (value, grads), (expected_value, expected) = got, want
  np.testing.assert_allclose(value, expected_value, rtol=rtol)
  for name, a, b in zip(('rows', 'scale', 'bias'), grads, expected):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=name)


def test_values_and_gradients_are_flax_s():
  assert_close(loss_and_grads(pallas_kernels(), jnp.float32),
               loss_and_grads(flax_layer_norm(jnp.float32), jnp.float32), rtol=2e-5)


def test_bfloat16_follows_flax_s():
  # Both compute in float32 and round the rows (and their gradient) to bfloat16.
  assert_close(loss_and_grads(pallas_kernels(), jnp.bfloat16),
               loss_and_grads(flax_layer_norm(jnp.bfloat16), jnp.bfloat16), rtol=1e-2)


@pytest.mark.parametrize('rows,block', [(4096, 64), (48, 16), (96, 32), (8, 0), (100, 0)])
def test_blocks_of_rows(rows, block):
  assert pallas_layer_norm.block_rows_for(rows) == block
  assert pallas_layer_norm.supports(rows, 128) is (block > 0)


def test_the_module_has_flax_s_parameters_and_falls_back_to_flax():
  x = jax.random.normal(jax.random.key(1), (3, 5, WIDTH))  # 15 rows: no block fits
  ours = pallas_layer_norm.PallasLayerNorm(encoder.LN_EPSILON, jnp.float32)
  flax_s = nn.LayerNorm(epsilon=encoder.LN_EPSILON)
  params = ours.init(jax.random.key(2), x)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, flax_s.init(jax.random.key(2), x))
  params = jax.tree.map(lambda p: p + jnp.arange(WIDTH) * 0.1, params)
  np.testing.assert_array_equal(ours.apply(params, x), flax_s.apply(params, x))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_lowers_to_one_triton_kernel_each_way_for_a_gpu(dtype):
  # ML-1M's training rows: 256 sequences of 128 positions, width 128.
  rows = jax.ShapeDtypeStruct((256 * 128, 128), dtype)
  vector = jax.ShapeDtypeStruct((128,), jnp.float32)
  options = pallas_layer_norm.Options(encoder.LN_EPSILON, pallas_layer_norm.block_rows_for(
      rows.shape[0]))
  grads = jax.grad(lambda *args: jnp.sum(pallas_layer_norm.layer_norm(*args, options)),
                   argnums=(0, 1, 2))
  text = jax.jit(grads).trace(rows, vector, vector).lower(
      lowering_platforms=('cuda',)).as_text()
  assert text.count('custom_call @__gpu$xla.gpu.triton') == 2


def test_only_training_runs_the_kernels():
  # An evaluated, served or exported model keeps flax's LayerNorm: it runs anywhere.
  config = encoder.ModelConfig(num_items=20, maxlen=16, num_blocks=1, hidden_units=16,
                              num_heads=1, dropout=0.0, position_mode='kernel',
                              layer_norm_impl='pallas')
  inputs = jnp.tile(jnp.arange(1, 17), (4, 1))  # 64 rows: a block
  for deterministic, kernels in ((False, True), (True, False)):
    model = encoder.Encoder(dataclasses.replace(config, deterministic=deterministic))
    params = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, inputs)
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, inputs, rngs={'dropout': jax.random.key(1)})
                           )(params)
    assert ('pallas_call' in str(jaxpr)) is kernels
