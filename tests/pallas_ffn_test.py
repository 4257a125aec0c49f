"""A block's second half by the Pallas kernels is the XLA path's (Pallas's interpreter on the
CPU): the same parameters, the same dropout masks, the same values and gradients; and it
lowers to one Triton kernel forward and one backward for a GPU."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pka_jax.kernels import ffn as pallas_ffn
from pka_jax.model import encoder

MAXLEN, WIDTH = 16, 16
CONFIG = encoder.ModelConfig(num_items=30, maxlen=MAXLEN, num_blocks=2, hidden_units=WIDTH,
                            num_heads=1, dropout=0.3, position_mode='kernel')


def inputs(width: int = MAXLEN):
  """Four rows of `width` items, left-padded by 0 to 11, 6, 2 and 0 items."""
  lengths = jnp.array([11, 6, 2, width])[:, None]
  position = jnp.arange(width)[None, :]
  return jnp.where(position >= width - lengths, 1 + (position * 7 + lengths) % 29, 0)


@functools.partial(jax.jit, static_argnums=0)
def outputs_and_grads(config, inputs_BxT, params):
  """The encoder's outputs, and the gradients of their weighted sum with respect to every
  parameter, under one dropout rng."""
  model = encoder.Encoder(config)
  weights = jnp.cos(jnp.arange(inputs_BxT.size * WIDTH)).reshape(*inputs_BxT.shape, WIDTH)

  def total(params):
    out = model.apply(params, inputs_BxT, rngs={'dropout': jax.random.key(2)})
    return jnp.sum(out.astype(jnp.float32) * weights), out

  (_, out), grads = jax.value_and_grad(total, has_aux=True)(params)
  return {'outputs': out, 'grads': grads}


def init(config, inputs_BxT, moved: bool = True):
  """The encoder's parameters; `moved` away from their starting values (biases start at
  zero, which would hide where they are added)."""
  params = encoder.Encoder(config).init({'params': jax.random.key(0),
                                        'dropout': jax.random.key(1)}, inputs_BxT)['params']
  if moved:
    params = jax.tree.map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size)).reshape(p.shape),
                          params)
  return {'params': params}


def assert_close(got, want, rtol):
  """Leaf by leaf, each to `rtol` of its largest magnitude."""
  for (path, b), a in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(),
                               err_msg=jax.tree_util.keystr(path))


def test_the_parameters_are_the_xla_path_s():
  pallas = dataclasses.replace(CONFIG, ffn_impl='pallas')
  xla_params, pallas_params = (init(config, inputs(), moved=False) for config in (CONFIG, pallas))
  assert jax.tree.structure(pallas_params) == jax.tree.structure(xla_params)
  jax.tree.map(np.testing.assert_array_equal, pallas_params, xla_params)


@pytest.mark.parametrize('width', [MAXLEN, 8])  # a full window; one trimmed to its right end
def test_values_and_gradients_are_the_xla_path_s(width):
  # Dropout on, padded rows: the kernels draw the XLA path's masks at each element's place
  # in the full window and zero the padded positions.
  params = init(CONFIG, inputs())
  got, want = (outputs_and_grads(dataclasses.replace(CONFIG, ffn_impl=impl), inputs(width), params)
               for impl in ('pallas', 'xla'))
  assert_close(got, want, rtol=2e-5)


def test_bfloat16_follows_the_xla_path():
  # Both round to bfloat16 at the same places; XLA may keep some sums in float32 (excess
  # precision), which two blocks amplify to about a percent. At the starting parameters: the
  # moved ones make the first block's attention gradients ill-conditioned in bfloat16 (XLA's
  # own differ there by half their size from float32's).
  config = dataclasses.replace(CONFIG, dtype='bfloat16')
  params = init(config, inputs(), moved=False)
  got, want = (outputs_and_grads(dataclasses.replace(config, ffn_impl=impl), inputs(), params)
               for impl in ('pallas', 'xla'))
  assert_close(got, want, rtol=4e-2)


def pallas_calls(config, inputs_BxT, params, **apply_options):
  model = encoder.Encoder(config)
  apply = functools.partial(model.apply, rngs={'dropout': jax.random.key(1)}, **apply_options)
  return str(jax.make_jaxpr(lambda p: apply(p, inputs_BxT))(params)).count('pallas_call')


def test_only_training_on_whole_batches_runs_the_kernels():
  # An evaluated, served or exported model keeps the XLA path (it runs anywhere), and so
  # does a microbatch: its dropout masks are those of its rows in the step's batch.
  config = dataclasses.replace(CONFIG, ffn_impl='pallas')
  params = init(config, inputs())
  # A block's kernel sits in both branches of its platform choice: the GPU's and the rest's.
  assert pallas_calls(config, inputs(), params) == 2 * config.num_blocks
  assert pallas_calls(dataclasses.replace(config, deterministic=True), inputs(), params) == 0
  assert pallas_calls(config, inputs(), params, rows_B=jnp.arange(4) + 4) == 0


@pytest.mark.parametrize('rows,width,block', [(4096, 128, 32), (48, 16, 16), (64, 256, 0),
                                              (64, 96, 0), (100, 128, 0), (8, 16, 0)])
def test_tiles_that_fit(rows, width, block):
  assert pallas_ffn.supports(rows, width) is (block > 0)
  if block:
    assert pallas_ffn.block_rows_for(rows) == block


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_lowers_to_one_triton_kernel_each_way_for_a_gpu(dtype):
  # ML-1M's training rows: 256 sequences of 128 positions, width 128.
  rows = jax.ShapeDtypeStruct((256 * 128, 128), dtype)
  vector, weight = (jax.ShapeDtypeStruct(shape, jnp.float32) for shape in ((128,), (128, 128)))
  options = pallas_ffn.Options(epsilon=encoder.LN_EPSILON, rate=0.2, queries=128, full_q=128,
                               block_rows=pallas_ffn.block_rows_for(rows.shape[0]))

  def total(residual, mixed, w_proj, b_proj, *params):
    valid = jnp.ones(residual.shape[:1], bool)
    seeds = jnp.arange(4, dtype=jnp.uint32).reshape(2, 2)
    return jnp.sum(pallas_ffn.feed_forward(residual, mixed, w_proj, b_proj, valid, *params,
                                           seeds, options))

  grads = jax.grad(total, argnums=tuple(range(10)))
  text = jax.jit(grads).trace(rows, rows, weight, vector, vector, vector, weight, vector,
                              weight, vector).lower(lowering_platforms=('cuda',)).as_text()
  assert text.count('custom_call @__gpu$xla.gpu.triton') == 2

