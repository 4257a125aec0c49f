"""The Pallas cross-entropy equals the full one in value and gradients (Pallas's interpreter
on the CPU), and lowers to Triton kernels for a GPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pka_jax.kernels import loss as pallas_loss
from pka_jax.training import losses

# 3·13 = 39 rows and 45 items: no multiple of the 16-row and 16-item tiles below; D 12 is no
# power of two (the kernels see it padded to 16).
B, T, D, N = 3, 13, 12, 45
SMALL = pallas_loss.Tiling(block_rows=16, block_items=16)


def inputs(dtype=jnp.float32, padded_sequences=0):
  """Hidden states, table and targets; `padded_sequences` of the B sequences have targets
  only in their last 4 positions (left padding), the others a few padding targets."""
  keys = jax.random.split(jax.random.key(1), 3)
  hidden = jax.random.normal(keys[0], (B, T, D)).astype(dtype)
  table = jax.random.normal(keys[1], (N + 1, D))
  targets = jax.random.randint(keys[2], (B, T), 0, N + 1)  # 0 (padding) included
  # The first and the last item (the last tile's last real column) are targets too.
  targets = targets.at[0, :3].set(0).at[1, 0].set(1).at[2, 0].set(N)
  return hidden, table, targets.at[:padded_sequences, :T - 4].set(0)


def value_and_grads(loss, hidden, table, targets):
  return jax.jit(jax.value_and_grad(lambda h, e: loss(h, e, targets)[0], argnums=(0, 1)))(
      hidden, table)


@pytest.mark.parametrize('tiling', [
    SMALL,  # 3 blocks of items, 3 of rows: the table's gradient in 3 parts of one block
    pallas_loss.Tiling(block_rows=16, block_items=16, min_programs=6),  # parts of 2 and 1
    pallas_loss.Tiling(block_rows=64, block_items=64, min_programs=1)])  # one tile each
@pytest.mark.parametrize('padded_sequences', [0, 2])  # 2: 21 rows with targets of 39
def test_equals_the_full_loss_in_value_and_gradients(tiling, padded_sequences):
  # With two sequences mostly padding, the rows with targets fill one block of 16 and part
  # of another: the kernels skip the third block, and the second is partly padding.
  hidden, table, targets = inputs(padded_sequences=padded_sequences)
  value, grads = value_and_grads(
      functools.partial(pallas_loss.pallas_cross_entropy, tiling=tiling), hidden, table, targets)
  expected_value, expected = value_and_grads(losses.full_cross_entropy, hidden, table, targets)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(grads[1][0], 0.0)  # the padding row is no class
  count = pallas_loss.pallas_cross_entropy(hidden, table, targets, SMALL)[1]
  assert float(count) == float(jnp.sum(targets > 0))


def test_by_hand():
  hidden = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  table = jnp.array([[9.0, 9.0], [2.0, 0.0], [0.0, 1.0]])  # row 0 (padding) is no class
  total, count = pallas_loss.pallas_cross_entropy(hidden, table, jnp.array([[2, 0]]), SMALL)
  # Position 0: logits (2, 0), target item 2 -> -log(e^0 / (e^2 + e^0)); position 1 padded.
  assert float(count) == 1.0
  assert float(total) == pytest.approx(np.log(np.exp(2) + 1))


def test_bfloat16_follows_the_xla_loss():
  # Both take bfloat16 products with float32 logits and sums, and cast the logits' gradient
  # to bfloat16 before its products: they differ by bfloat16 rounding only.
  hidden, table, targets = inputs(jnp.bfloat16)
  value, grads = value_and_grads(
      functools.partial(pallas_loss.pallas_cross_entropy, tiling=SMALL), hidden, table, targets)
  expected_value, expected = value_and_grads(losses.chunked_cross_entropy, hidden, table,
                                             targets)
  assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32
  assert float(value) == pytest.approx(float(expected_value), rel=1e-5)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=0.01 * float(jnp.abs(want.astype(jnp.float32)).max()))


@pytest.mark.parametrize('size', [0, 8, 24])
def test_tiles_are_powers_of_two(size):
  with pytest.raises(ValueError, match='block_items .*power of two'):
    pallas_loss.Tiling(block_items=size)


@pytest.mark.parametrize('dtype,rows,width', [
    (jnp.float32, 256, 128), (jnp.bfloat16, 256, 128), (jnp.bfloat16, 100, 50)])
def test_lowers_to_three_triton_kernels_for_a_gpu(dtype, rows, width):
  # ML-1M's shapes: 32,768 positions, 3,416 items (no multiple of the tile), d 128; and a
  # width that is no power of two. Lowering builds each kernel's Triton IR, where a block that
  # is no power of two or an op Triton lacks fails.
  hidden = jax.ShapeDtypeStruct((rows, 128, width), dtype)
  table = jax.ShapeDtypeStruct((3417, width), jnp.float32)
  targets = jax.ShapeDtypeStruct((rows, 128), jnp.int32)

  def grads(h, e, t):
    loss = lambda h, e: pallas_loss.pallas_cross_entropy(h, e, t, interpret=False)[0]
    return jax.value_and_grad(loss, argnums=(0, 1))(h, e)

  text = jax.jit(grads).trace(hidden, table, targets).lower(
      lowering_platforms=('cuda',)).as_text()
  assert text.count('custom_call @__gpu$xla.gpu.triton') == 3
  assert 'dot(' not in text.split('custom_call')[0]  # no logits product left to XLA

