"""The fused Pallas attention trains as the plain path does (Pallas's interpreter on the CPU:
same outputs, dropout masks and gradients), and lowers to two Triton kernels for a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pka_jax.kernels import attention as pallas_attention
from pka_jax.model import attention
from pka_jax.model.dropout import Window

B, T, D, H = 3, 16, 32, 2  # head size 16: the smallest Triton tile


def attend(impl, *, dtype=jnp.float32, window=None, k_kernel=True, v_kernel=True,
           dropout=0.3, rows_B=None):
  """The loss-like sum of a training attention's output, and its gradients with respect to
  the parameters, the inputs and both kernels. Rows 1 and 2 start with padding keys; in row
  2 the first queries see no valid key at all (uniform weights)."""
  module = attention.CausalSelfAttention(num_heads=H, dropout=dropout, deterministic=False,
                                         impl=impl, dtype=dtype, kernels_on_logits=True)
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (B, T, D))
  valid = jnp.arange(T)[None, :] >= jnp.array([0, 5, 12])[:, None]
  lower = lambda key: jnp.tril(jax.random.normal(key, (T, T))) * 0.3 + jnp.eye(T)
  tk = lower(keys[1]) if k_kernel else None
  fv = lower(keys[2]) if v_kernel else None
  if rows_B is not None:
    window = Window(maxlen=T, rows_B=rows_B)
  call = dict(key_valid_BxT=valid, window=window)
  params = module.init({'params': keys[3], 'dropout': keys[4]}, x, x, x, k_kernel_TxT=tk,
                       v_kernel_TxT=fv, **call)
  # Biases start at zero; nonzero ones reach every term (the value bias's `rowsum(W) bv`).
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: (jax.random.normal(jax.random.key(len(p)), p.shape) * 0.5
                       if 'bias' in jax.tree_util.keystr(path) else p), params)
  weights = jnp.cos(jnp.arange(B * T * D)).reshape(B, T, D)

  def total(params, x, tk, fv):
    out = module.apply(params, x, x, x, k_kernel_TxT=tk, v_kernel_TxT=fv,
                       rngs={'dropout': keys[5]}, **call)
    return jnp.sum(out.astype(jnp.float32) * weights)

  return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2, 3)))(params, x, tk, fv)


def assert_same(got, want, rtol, atol_share):
  (value, grads), (expected_value, expected) = got, want
  np.testing.assert_allclose(value, expected_value, rtol=rtol)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                          jax.tree.leaves(grads)):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name:  # its true gradient is zero: rounding noise only
      continue
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(b, a, rtol=rtol, atol=atol_share * np.abs(a).max(),
                               err_msg=name)


@pytest.mark.parametrize('case', [
    dict(),
    dict(window=Window(maxlen=64)),  # a trimmed window: masks of the full one's positions
    dict(k_kernel=False),
    dict(v_kernel=False)])
def test_trains_as_the_plain_path(case):
  assert_same(attend('pallas', **case), attend('plain', **case), rtol=1e-5, atol_share=1e-5)


def test_bfloat16_follows_the_plain_path():
  assert_same(attend('pallas', dtype=jnp.bfloat16), attend('plain', dtype=jnp.bfloat16),
              rtol=1e-2, atol_share=2e-2)


def test_masks_are_the_dropout_module_s():
  # Another rate draws other masks: a kernel that ignored the rate, or drew its own bits,
  # would not match the plain path at both.
  for rate in (0.1, 0.6):
    assert_same(attend('pallas', dropout=rate), attend('plain', dropout=rate), rtol=1e-5,
                atol_share=1e-5)
  assert not np.isclose(attend('pallas', dropout=0.1)[0], attend('pallas', dropout=0.6)[0])


def test_microbatch_rows_fall_back_to_the_plain_path():
  rows_B = jnp.array([4, 0, 2])  # rows of a larger batch: not what the kernel indexes
  got, want = attend('pallas', rows_B=rows_B), attend('plain', rows_B=rows_B)
  np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize('queries,keys,head_dim,fits', [
    (128, 128, 128, True), (16, 16, 16, True), (1, 128, 128, False), (128, 200, 64, False),
    (128, 128, 8, False)])
def test_supports_tiles_of_powers_of_two(queries, keys, head_dim, fits):
  assert pallas_attention.supports(queries, keys, head_dim) is fits


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_lowers_to_two_triton_kernels_for_a_gpu(dtype):
  # ML-1M's training shapes: 256 sequences of 128 positions, one head of 128.
  batch, size, heads, head_dim = 256, 128, 1, 128
  options = pallas_attention.Options(
      scale=head_dim**-0.5, rate=0.3, full_q=size, off_q=0, full_t=size, off_t=0,
      has_k_kernel=True, has_v_kernel=True)
  tile = jax.ShapeDtypeStruct((batch, size, heads, head_dim), dtype)
  kernel = jax.ShapeDtypeStruct((size, size), dtype)

  def grads(q, k, v, tk, fv, bias, valid, seed):
    out = lambda *args: jnp.sum(pallas_attention.fused_attention(
        *args, valid, seed, options).astype(jnp.float32))
    return jax.grad(out, argnums=range(6))(q, k, v, tk, fv, bias)

  text = jax.jit(grads).trace(
      tile, tile, tile, kernel, kernel, jax.ShapeDtypeStruct((heads, head_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, size), bool), jax.ShapeDtypeStruct((2,), jnp.uint32),
  ).lower(lowering_platforms=('cuda',)).as_text()
  assert text.count('custom_call @__gpu$xla.gpu.triton') == 2
