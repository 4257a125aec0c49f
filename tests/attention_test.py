"""Position schemes against their formulas: masks, RoPE's relative property, CoPE positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  # B x T x H x K: the same query and key vector at each of 6 positions.
  q = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (8,)), (1, 6, 1, 8))
  k = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (8,)), (1, 6, 1, 8))
  logits = np.asarray(jnp.einsum('bihk,bjhk->ij', attention.rotary(q), attention.rotary(k)))
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


def test_rotary_of_the_last_rows_equals_the_last_rows_of_rotary():
  x = jax.random.normal(jax.random.key(5), (2, 6, 2, 8))
  np.testing.assert_allclose(attention.rotary(x[:, -2:], first_position=4),
                             attention.rotary(x)[:, -2:], rtol=1e-6)


B, T, D = 3, 8, 16
VALID = jnp.array([[False] * 3 + [True] * 5, [True] * 8, [False] * 7 + [True]])


def lower_triangular(seed: int) -> jax.Array:
  return jnp.tril(jax.random.uniform(jax.random.key(seed), (T, T))) + jnp.eye(T)


@pytest.mark.parametrize('heads', [1, 2])
@pytest.mark.parametrize('mask_padding_keys', [True, False])
@pytest.mark.parametrize('sides', ['k', 'v', 'kv', ''])
def test_kernels_on_logits_on_inputs_and_fused_attention_agree(heads, mask_padding_keys, sides):
  # softmax((Q K'ᵀ) U + q·bk) (A F) V' + rowsum(A) bv  ==  softmax(Q Kᵀ) A V with K and V
  # computed from kernel-mixed inputs, == jax.nn.dot_product_attention on those inputs.
  x = jax.random.normal(jax.random.key(0), (B, T, D)) * VALID[..., None]
  q_in = jax.random.normal(jax.random.key(1), (B, T, D))
  kernels = {'k_kernel_TxT': lower_triangular(2) if 'k' in sides else None,
             'v_kernel_TxT': lower_triangular(3) if 'v' in sides else None}
  key_valid = VALID if mask_padding_keys else None

  def module(**fields):
    return attention.CausalSelfAttention(num_heads=heads, dropout=0.0, deterministic=True,
                                         **fields)

  params = module().init(jax.random.key(4), q_in, x, x, key_valid, **kernels)
  # Biases away from zero, so that their routes around the kernels are exercised.
  params = jax.tree.map(lambda p: p + 0.3, params)
  outputs = {
      name: np.asarray(module(**fields).apply(params, q_in, x, x, key_valid, **kernels))
      for name, fields in [('logits', dict(kernels_on_logits=True)),
                           ('inputs', dict(kernels_on_logits=False)),
                           ('fused', dict(impl='xla'))]}
  # Rows of padded queries see no key; the block zeroes them, so only real queries count.
  real = np.asarray(VALID)
  for name in ('inputs', 'fused'):
    np.testing.assert_allclose(outputs['logits'][real], outputs[name][real], rtol=2e-5,
                               atol=2e-5, err_msg=name)


def test_one_query_row_equals_the_last_row_of_all_queries():
  x = jax.random.normal(jax.random.key(0), (B, T, D)) * VALID[..., None]
  kernels = {'k_kernel_TxT': lower_triangular(2), 'v_kernel_TxT': lower_triangular(3)}
  module = attention.CausalSelfAttention(num_heads=2, dropout=0.0, deterministic=True)
  params = module.init(jax.random.key(4), x, x, x, VALID, **kernels)
  every = module.apply(params, x, x, x, VALID, **kernels)
  last = module.apply(params, x[:, -1:], x, x, VALID, **kernels)
  np.testing.assert_allclose(last[:, 0], every[:, -1], rtol=2e-5, atol=2e-5)
