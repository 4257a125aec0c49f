"""Position schemes against their formulas: masks, RoPE's relative property, CoPE positions."""

import jax
import jax.numpy as jnp
import numpy as np

from pka_jax import attention


def test_mask_hides_the_future_and_optionally_padding_keys():
  valid = jnp.array([[False, True, True]])
  np.testing.assert_array_equal(
      attention.attention_mask(valid, mask_padding_keys=True)[0, 0],
      [[False, False, False], [False, True, False], [False, True, True]])
  np.testing.assert_array_equal(
      attention.attention_mask(valid, mask_padding_keys=False)[0, 0],
      np.tril(np.ones((3, 3), bool)))


def test_rotary_logits_depend_only_on_the_distance():
  q = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (8,)), (1, 1, 6, 8))
  k = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (8,)), (1, 1, 6, 8))
  logits = np.asarray(jnp.einsum('bhik,bhjk->ij', attention.rotary(q), attention.rotary(k)))
  # Shifting query and key by the same amount leaves every logit unchanged.
  np.testing.assert_allclose(logits[1:, 1:], logits[:-1, :-1], rtol=1e-5, atol=1e-5)
  assert not np.isclose(logits[0, 0], logits[3, 0])  # positions do matter
  np.testing.assert_allclose(np.linalg.norm(attention.rotary(q), axis=-1),
                             np.linalg.norm(q, axis=-1), rtol=1e-5)


def test_contextual_positions_follow_the_gate_sums():
  size, dim = 3, 2
  q = jax.random.normal(jax.random.key(0), (1, 1, size, dim))
  logits = jax.random.normal(jax.random.key(1), (1, 1, size, size))
  mask = jnp.tril(jnp.ones((size, size), bool))[None, None]
  module = attention.ContextualPosition(maxlen=size)
  params = module.init(jax.random.key(2), q, logits, mask)
  out = np.asarray(module.apply(params, q, logits, mask))[0, 0]

  table = np.asarray(params['params']['positions'])
  q_, logits_ = np.asarray(q)[0, 0], np.asarray(logits)[0, 0]
  for i in range(size):
    for j in range(size):
      gates = [1 - 1 / (1 + np.exp(-logits_[i, m])) for m in range(j, i + 1)]
      position = min(sum(gates), size - 1) if j <= i else 0.0
      low = int(np.floor(position))
      high = min(low + 1, size - 1)
      frac = position - low
      expected = (1 - frac) * q_[i] @ table[low] + frac * q_[i] @ table[high]
      np.testing.assert_allclose(out[i, j], expected, rtol=1e-5, atol=1e-6)
