"""Hashed dropout masks: the keep rate, independence between elements and between calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pka_jax.model import dropout

SHAPE = (64, 128, 128)  # 1,048,576 elements: a binomial standard error of about 0.0005
N = 64 * 128 * 128


def within_sigmas(fraction: float, p: float, n: int, sigmas: float = 5.0) -> bool:
  return abs(fraction - p) < sigmas * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize('impl', dropout.DROPOUT_IMPLS)
@pytest.mark.parametrize('rate', [0.1, 0.3, 0.5, 0.9])
def test_keep_fraction_is_one_minus_the_rate(impl, rate):
  keep = np.asarray(dropout.keep_mask(jax.random.key(1), rate, SHAPE, impl))
  assert within_sigmas(keep.mean(), 1 - rate, N)
  # Along every axis: no row, column or depth of the tensor is favoured.
  for axis in range(3):
    means = keep.mean(axis=tuple(a for a in range(3) if a != axis))
    count = N // SHAPE[axis]
    assert np.all(np.abs(means - (1 - rate)) < 6 * np.sqrt(rate * (1 - rate) / count)), axis


def test_neighbouring_elements_are_uncorrelated():
  bits = np.asarray(dropout.keep_mask(jax.random.key(2), 0.5, (N,))).astype(np.float64)
  centred = bits - bits.mean()
  for lag in (1, 2, 128, 128 * 128):
    correlation = (centred[:-lag] * centred[lag:]).mean() / centred.var()
    assert abs(correlation) < 5 / np.sqrt(N), lag


def test_two_calls_draw_independent_masks():
  rate = 0.3
  first, second = (np.asarray(dropout.keep_mask(key, rate, SHAPE))
                   for key in jax.random.split(jax.random.key(3)))
  both_kept = (first & second).mean()
  assert within_sigmas(both_kept, (1 - rate)**2, N)
  assert (first != second).any()


def test_module_scales_kept_values_and_is_the_identity_when_deterministic():
  x = jnp.ones((32, 64, 16))
  module = dropout.Dropout(rate=0.25, deterministic=False)
  out = np.asarray(module.apply({}, x, rngs={'dropout': jax.random.key(4)}))
  kept = out != 0
  np.testing.assert_allclose(out[kept], 1 / 0.75, rtol=1e-6)
  assert within_sigmas(kept.mean(), 0.75, x.size)
  same = dropout.Dropout(rate=0.25, deterministic=True).apply({}, x)
  np.testing.assert_array_equal(same, x)


def test_hash_is_a_bijection_of_the_index_for_a_fixed_seed():
  # Distinct indices give distinct bits (lowbias32 and the keyed rounds are invertible), so
  # a mask has no structure a smaller hash range could introduce.
  bits = np.asarray(dropout.hash_bits(jnp.array([7, 11], jnp.uint32), (1 << 20,)))
  assert len(np.unique(bits)) == len(bits)


def test_a_window_indexes_its_elements_in_the_whole_batch_at_full_width():
  # Rows 1 and 3 of a batch of 4, the last 3 of maxlen 5 positions, as attention weights
  # (B, H, Q, T): the index is numpy's flat index into the whole (4, 2, 5, 5) array.
  window = dropout.Window(maxlen=5, rows_B=jnp.array([1, 3]))
  index = np.asarray(window.index((2, 2, 3, 3), position_axes=(2, 3)))
  b, h, q, t = np.meshgrid([1, 3], [0, 1], [2, 3, 4], [2, 3, 4], indexing='ij')
  np.testing.assert_array_equal(index, np.ravel_multi_index((b, h, q, t), (4, 2, 5, 5)))
  # All rows at full width: the array's own flat index, so such masks are unchanged.
  whole = np.asarray(dropout.Window(maxlen=5).index((4, 5, 6), position_axes=(1,)))
  np.testing.assert_array_equal(whole, np.arange(4 * 5 * 6).reshape(4, 5, 6))


def test_a_microbatch_of_a_trimmed_batch_draws_the_whole_batchs_masks():
  module = dropout.Dropout(rate=0.5, deterministic=False)
  rng = {'dropout': jax.random.key(5)}
  x = jnp.ones((8, 16, 4))
  whole = np.asarray(module.apply({}, x, dropout.Window(maxlen=16), rngs=rng))
  # The third of four microbatches, split as microbatching.split_microbatches splits.
  rows = jnp.array([2, 6])
  part = np.asarray(module.apply({}, x[:2, -6:], dropout.Window(maxlen=16, rows_B=rows),
                                 rngs=rng))
  np.testing.assert_array_equal(part, whole[np.asarray(rows)][:, -6:])
