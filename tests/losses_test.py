"""Losses: the chunked and blockwise cross-entropies equal the full one in value and gradients."""

import functools

import jax
import jax.numpy as jnp
import jaxprs
import numpy as np
import pytest

from pka_jax.model import item_table
from pka_jax.training import losses

B, T, D, N = 3, 5, 4, 23  # N + 1 rows in the table; 23 is no multiple of the block sizes


def inputs():
  keys = jax.random.split(jax.random.key(0), 3)
  hidden = jax.random.normal(keys[0], (B, T, D))
  table = jax.random.normal(keys[1], (N + 1, D))
  targets = jax.random.randint(keys[2], (B, T), 0, N + 1)  # 0 (padding) included
  return hidden, table, targets.at[0, :2].set(0)


def test_full_cross_entropy_by_hand():
  hidden = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  table = jnp.array([[9.0, 9.0], [2.0, 0.0], [0.0, 1.0]])  # row 0 (padding) is no class
  total, count = losses.full_cross_entropy(hidden, table, jnp.array([[2, 0]]))
  # Position 0: logits (2, 0), target item 2 -> -log(e^0 / (e^2 + e^0)); position 1 padded.
  assert float(count) == 1.0
  assert float(total) == pytest.approx(np.log(np.exp(2) + 1))


# Items in blocks of 1..64 (23 items: no multiple of most); rows in chunks of 1..64 (15 rows:
# chunks of 4 and 7 leave a padded last chunk; 64 holds every row in one chunk).
@pytest.mark.parametrize('loss,size', [
    *((losses.blockwise_cross_entropy, size) for size in (1, 5, 8, 23, 64)),
    *((functools.partial(losses.blockwise_cross_entropy, chunk_rows=rows), 5)
      for rows in (1, 4, 7)),  # items in blocks, rows in chunks
    *((losses.chunked_cross_entropy, size) for size in (1, 4, 7, 15, 64))])
def test_exact_variants_equal_the_full_loss(loss, size):
  hidden, table, targets = inputs()

  def full(h, e):
    return losses.full_cross_entropy(h, e, targets)[0]

  def variant(h, e):
    return loss(h, e, targets, size)[0]

  np.testing.assert_allclose(jax.jit(variant)(hidden, table), full(hidden, table), rtol=1e-5)
  expected = jax.grad(full, argnums=(0, 1))(hidden, table)
  got = jax.jit(jax.grad(variant, argnums=(0, 1)))(hidden, table)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(got[1][0], 0.0)  # the padding row is no class
  assert float(loss(hidden, table, targets, size)[1]) == float(jnp.sum(targets > 0))


@pytest.mark.parametrize('loss', [
    lambda h, e, t: losses.chunked_cross_entropy(h, e, t, 4),
    lambda h, e, t: losses.blockwise_cross_entropy(h, e, t, 5, chunk_rows=4)])
def test_chunks_without_a_real_target_are_never_computed(loss):
  # 8 real targets among 15 rows, chunks of 4: the real rows fill two chunks and the padding
  # rows' chunks are skipped, so not even a NaN there reaches the loss or its gradients.
  hidden, table, _ = inputs()
  real = jnp.zeros((B, T), bool).at[0, 2:].set(True).at[1, :].set(True)
  targets = jnp.where(real, 1 + jnp.arange(B * T).reshape(B, T) % N, 0)
  poisoned = jnp.where(real[..., None], hidden, jnp.nan)

  def chunked(h, e):
    return loss(h, e, targets)[0]

  def full_on_real_rows(h, e):
    return losses.full_cross_entropy(jnp.where(real[..., None], h, 0.0), e, targets)[0]

  value, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(poisoned, table)
  expected_value, expected = jax.value_and_grad(full_on_real_rows, argnums=(0, 1))(
      hidden, table)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_chunked_in_bfloat16_follows_float32():
  hidden, table, targets = inputs()
  loss = lambda h, e: losses.chunked_cross_entropy(h, e, targets, 4)[0]
  full_value, full_grads = jax.value_and_grad(loss, argnums=(0, 1))(hidden, table)
  half_value, half_grads = jax.value_and_grad(loss, argnums=(0, 1))(
      hidden.astype(jnp.bfloat16), table)
  assert half_grads[0].dtype == jnp.bfloat16 and half_grads[1].dtype == jnp.float32
  # Logits from bfloat16 inputs carry ~0.4% relative error each; the loss accumulates in
  # float32.
  assert float(half_value) == pytest.approx(float(full_value), rel=1e-2)
  for g, e in zip(half_grads, full_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), e, atol=0.05 * float(jnp.abs(e).max()))


@pytest.mark.parametrize('loss', [
    lambda h, e, t: losses.chunked_cross_entropy(h, e, t, 4),
    lambda h, e, t: losses.blockwise_cross_entropy(h, e, t, 5, chunk_rows=4)])
def test_accelerators_loop_over_every_chunk_a_known_number_of_times(loss, monkeypatch):
  # A GPU reads a loop's trip count back to the host every trip: off the CPU the chunk loops
  # visit every chunk (a scan), padding ones included, and still give the full loss.
  hidden, table, targets = inputs()

  def full(h, e):
    return losses.full_cross_entropy(h, e, targets)[0]

  def traced(h, e):
    return loss(h, e, targets)[0]

  def loops():
    grad = jax.grad(traced, argnums=(0, 1))
    return {eqn.primitive.name for eqn in jaxprs.equations(
        jax.make_jaxpr(grad)(hidden, table).jaxpr)} & {'while', 'scan'}

  assert 'while' in loops()  # the CPU's: up to the last chunk with a real target
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert loops() == {'scan'}
  value, grads = jax.jit(jax.value_and_grad(traced, argnums=(0, 1)))(hidden, table)
  want_value, want = jax.value_and_grad(full, argnums=(0, 1))(hidden, table)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for g, e in zip(grads, want):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_chunk_rows_fit_the_backend_budget():
  # CPU: 8 MiB of float32 logits a chunk; 3,416 items -> 614 rows -> 512 (a power of 2).
  assert item_table.chunk_rows_for(3416, 32768, 'cpu') == 512
  assert item_table.chunk_rows_for(3416, 500, 'cpu') == 500  # never more than all rows
  assert item_table.chunk_rows_for(10_000_000, 32768, 'cpu') == 128  # floor: compute-bound
  assert item_table.chunk_rows_for(3416, 32768, 'gpu') == 32768  # 1 GiB holds them all


@pytest.mark.parametrize('loss', [
    lambda h, e, t, rows: losses.chunked_cross_entropy(h, e, t, rows),
    lambda h, e, t, rows: losses.blockwise_cross_entropy(h, e, t, 5, chunk_rows=rows)])
def test_real_rows_are_sorted_first_only_when_there_are_chunks_to_skip(loss):
  # 15 rows: chunks of 4 sort the real targets first; one chunk of 15 (an accelerator's
  # whole batch) has none to skip, and its step carries no sort (test_exact_variants_equal_
  # the_full_loss checks its values).
  hidden, table, targets = inputs()

  def sorts(rows):
    grad = jax.grad(lambda h, e: loss(h, e, targets, rows)[0], argnums=(0, 1))
    return any(eqn.primitive.name == 'sort'
               for eqn in jaxprs.equations(jax.make_jaxpr(grad)(hidden, table).jaxpr))

  assert sorts(4) and not sorts(B * T)


def test_blockwise_memory_is_one_block():
  # B·T = 4096 positions, 20,000 items: full logits are 328 MB in float32.
  hidden = jax.ShapeDtypeStruct((32, 128, 64), jnp.float32)
  table = jax.ShapeDtypeStruct((20_001, 64), jnp.float32)
  targets = jax.ShapeDtypeStruct((32, 128), jnp.int32)

  def temp_bytes(loss):
    grad = jax.grad(lambda h, e, t: loss(h, e, t)[0], argnums=(0, 1))
    compiled = jax.jit(grad).lower(hidden, table, targets).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full = temp_bytes(losses.full_cross_entropy)
  blockwise = temp_bytes(lambda h, e, t: losses.blockwise_cross_entropy(h, e, t, 1024))
  chunked = temp_bytes(lambda h, e, t: losses.chunked_cross_entropy(h, e, t, 256))
  assert full > 4096 * 20_000 * 4  # at least the logits
  assert blockwise < full / 5
  assert chunked < full / 5  # 256 rows' logits at a time: 20 MB


def test_blockwise_gradient_holds_no_copy_of_the_table():
  # 200,000 items (51 MB in float32) against 4,096 positions: the table's gradient is the
  # output, written block by block in place; no padded copy, no per-chunk gradient of the
  # whole table to add up (which held 3.3x the table).
  hidden = jax.ShapeDtypeStruct((32, 128, 64), jnp.float32)
  table = jax.ShapeDtypeStruct((200_001, 64), jnp.float32)
  targets = jax.ShapeDtypeStruct((32, 128), jnp.int32)
  grad = jax.grad(lambda h, e, t: losses.blockwise_cross_entropy(h, e, t, 1024)[0],
                  argnums=(0, 1))
  compiled = jax.jit(grad).lower(hidden, table, targets).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 200_001 * 64 * 4 / 2


def test_sampled_bce_by_hand():
  hidden, table, targets = inputs()
  rng = jax.random.key(7)
  total, count = losses.sampled_bce(hidden, table, targets, rng)
  negatives = np.asarray(jax.random.randint(rng, targets.shape, 1, N + 1))
  h, e, t = np.asarray(hidden), np.asarray(table), np.asarray(targets)
  expected = 0.0
  for b in range(B):
    for i in range(T):
      if t[b, i]:
        positive, negative = h[b, i] @ e[t[b, i]], h[b, i] @ e[negatives[b, i]]
        expected += np.log1p(np.exp(-positive)) + np.log1p(np.exp(negative))
  assert float(count) == np.count_nonzero(t)
  assert float(total) == pytest.approx(expected, rel=1e-5)
