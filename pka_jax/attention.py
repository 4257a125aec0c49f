"""Position schemes for causal self-attention: PKA kernels, masks, RoPE and CoPE.

PKA (DESIGN §1) keeps positions out of the item vectors: a Toeplitz kernel mixes the inputs
of the keys (equivalently, multiplies the logits on the right by an upper-triangular `U`)
and a full lower-triangular kernel mixes the inputs of the values (`L V`). Both matrices are
lower triangular over input positions, so no output can see a later input.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

KERNEL_KINDS = ('none', 'toeplitz', 'full')


def _abs_normal(std: float):
  def init(key, shape, dtype=jnp.float32):
    return jnp.abs(std * jax.random.normal(key, shape, dtype))
  return init


def toeplitz_matrix(g_T: jax.Array) -> jax.Array:
  """`M[i, j] = g[i - j]` for `i >= j`, else 0."""
  size = g_T.shape[0]
  distance_TxT = jnp.arange(size)[:, None] - jnp.arange(size)[None, :]
  return jnp.where(distance_TxT >= 0, g_T[jnp.clip(distance_TxT, 0)], 0.0)


class ToeplitzKernel(nn.Module):
  """Lower-triangular Toeplitz kernel `ĝ[i - j]` with `ĝ = g / ||g||`.

  `g[0]` is fixed to 1 unless `learn_first` (the value-side Toeplitz of the ablations);
  the rest starts at `|N(0, init_std)|`.
  """

  maxlen: int
  init_std: float
  learn_first: bool = False

  @nn.compact
  def __call__(self) -> jax.Array:
    tail = self.param('g_tail', _abs_normal(self.init_std), (self.maxlen - 1,))
    if self.learn_first:
      first = self.param('g_first', nn.initializers.ones, (1,))
    else:
      first = jnp.ones((1,), tail.dtype)
    g_T = jnp.concatenate([first, tail])
    return toeplitz_matrix(g_T / jnp.linalg.norm(g_T))


class FullKernel(nn.Module):
  """Full lower-triangular kernel, `I + |N(0, init_std)|` below the diagonal at start.

  Normalised by the Frobenius norm of its lower triangle. Positions are absolute and counted
  from the right end, which left padding never moves.
  """

  maxlen: int
  init_std: float

  @nn.compact
  def __call__(self) -> jax.Array:
    def init(key, shape, dtype=jnp.float32):
      below = jnp.tril(_abs_normal(self.init_std)(key, shape, dtype), k=-1)
      return jnp.eye(shape[0], dtype=dtype) + below

    f_TxT = jnp.tril(self.param('f', init, (self.maxlen, self.maxlen)))
    return f_TxT / jnp.linalg.norm(f_TxT)


def make_kernel(kind: str, *, maxlen: int, init_std: float, learn_first: bool, name: str):
  if kind == 'toeplitz':
    return ToeplitzKernel(maxlen, init_std, learn_first=learn_first, name=name)
  if kind == 'full':
    return FullKernel(maxlen, init_std, name=name)
  raise ValueError(f'Unknown positional kernel {kind!r}; expected one of {KERNEL_KINDS}')


def apply_kernel(kernel_TxT: jax.Array | None, x_BxTxD: jax.Array) -> jax.Array:
  """Mixes inputs over positions: row `i` of the result is `sum_j K[i, j] x[j]`."""
  if kernel_TxT is None:
    return x_BxTxD
  return jnp.einsum('ij,bjd->bid', kernel_TxT, x_BxTxD)


def attention_mask(valid_BxT: jax.Array, mask_padding_keys: bool) -> jax.Array:
  """Boolean `B×1×T×T` mask: key `j` is visible to query `i` iff `j <= i` (and `j` is real)."""
  size = valid_BxT.shape[1]
  causal_TxT = jnp.tril(jnp.ones((size, size), dtype=bool))
  mask_BxTxT = jnp.broadcast_to(causal_TxT, (valid_BxT.shape[0], size, size))
  if mask_padding_keys:
    mask_BxTxT = mask_BxTxT & valid_BxT[:, None, :]
  return mask_BxTxT[:, None]


def rotary(x_BxHxTxK: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding over the last axis (pairs of halves), positions `0..T-1`."""
  size, dim = x_BxHxTxK.shape[-2], x_BxHxTxK.shape[-1]
  if dim % 2:
    raise ValueError(f'rotary: head dimension {dim} must be even')
  inv_freq = base ** (-jnp.arange(0, dim // 2, dtype=jnp.float32) / (dim // 2))
  angle_TxK2 = jnp.arange(size, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  cos, sin = jnp.cos(angle_TxK2)[None, None], jnp.sin(angle_TxK2)[None, None]
  first, second = jnp.split(x_BxHxTxK, 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


class ContextualPosition(nn.Module):
  """CoPE-style contextual positions, as the paper's baseline computes them.

  Gate `1 - sigmoid(logit[i, m])` for each visible key `m`; the position of key `j` seen from
  query `i` is the sum of gates over `j <= m <= i`. Learned embeddings at integer positions,
  linearly interpolated at fractional ones and dotted with the query, are added to the logits.
  """

  maxlen: int

  @nn.compact
  def __call__(self, q_BxHxTxK, logits_BxHxTxT, mask_Bx1xTxT) -> jax.Array:
    head_dim = q_BxHxTxK.shape[-1]
    table_PxK = self.param('positions', nn.initializers.xavier_uniform(), (self.maxlen, head_dim))
    gates = jnp.where(mask_Bx1xTxT, 1.0 - jax.nn.sigmoid(logits_BxHxTxT), 0.0)
    position = jnp.flip(jnp.cumsum(jnp.flip(gates, -1), axis=-1), -1)
    position = jnp.clip(position, 0, self.maxlen - 1)
    floor = jnp.floor(position)
    weight_ceil = position - floor
    per_position_BxHxTxP = jnp.einsum('bhik,pk->bhip', q_BxHxTxK, table_PxK)
    floor_i = floor.astype(jnp.int32)
    ceil_i = jnp.minimum(floor_i + 1, self.maxlen - 1)
    at_floor = jnp.take_along_axis(per_position_BxHxTxP, floor_i, axis=-1)
    at_ceil = jnp.take_along_axis(per_position_BxHxTxP, ceil_i, axis=-1)
    return (1.0 - weight_ceil) * at_floor + weight_ceil * at_ceil


class CausalSelfAttention(nn.Module):
  """Multi-head causal attention with biases; optional RoPE or CoPE on the logits."""

  num_heads: int
  dropout: float
  deterministic: bool
  rope: bool = False
  cope_maxlen: int = 0  # > 0 turns on contextual positions

  @nn.compact
  def __call__(self, q_in_BxTxD, k_in_BxTxD, v_in_BxTxD, mask_Bx1xTxT) -> jax.Array:
    d = q_in_BxTxD.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'hidden size {d} is not divisible by {self.num_heads} heads')
    head_dim = d // self.num_heads

    def dense(name: str) -> nn.Dense:
      return nn.Dense(d, kernel_init=nn.initializers.xavier_uniform(), name=name)

    def split_heads(x_BxTxD: jax.Array) -> jax.Array:
      return x_BxTxD.reshape(*x_BxTxD.shape[:2], self.num_heads, head_dim)

    q_BxTxHxK = split_heads(dense('query')(q_in_BxTxD))
    k_BxTxHxK = split_heads(dense('key')(k_in_BxTxD))
    v_BxTxHxK = split_heads(dense('value')(v_in_BxTxD))
    q_BxHxTxK, k_BxHxTxK = (jnp.swapaxes(a, 1, 2) for a in (q_BxTxHxK, k_BxTxHxK))
    if self.rope:
      q_BxHxTxK, k_BxHxTxK = rotary(q_BxHxTxK), rotary(k_BxHxTxK)
    logits_BxHxTxT = jnp.einsum('bhik,bhjk->bhij', q_BxHxTxK, k_BxHxTxK) / math.sqrt(head_dim)
    if self.cope_maxlen:
      logits_BxHxTxT = logits_BxHxTxT + ContextualPosition(self.cope_maxlen, name='cope')(
          q_BxHxTxK, logits_BxHxTxT, mask_Bx1xTxT)
    # A finite floor, not -inf: fully masked rows stay finite (and so do their gradients).
    lowest = jnp.finfo(logits_BxHxTxT.dtype).min
    weights = jax.nn.softmax(jnp.where(mask_Bx1xTxT, logits_BxHxTxT, lowest), axis=-1)
    # A query with no visible key (a padded position) would get NaN; it gets zeros instead.
    weights_BxHxTxT = jnp.where(mask_Bx1xTxT.any(-1, keepdims=True), weights, 0.0)
    weights_BxHxTxT = nn.Dropout(self.dropout)(weights_BxHxTxT, deterministic=self.deterministic)
    out_BxTxHxK = jnp.einsum('bhij,bjhk->bihk', weights_BxHxTxT, v_BxTxHxK)
    return dense('out')(out_BxTxHxK.reshape(*out_BxTxHxK.shape[:2], d))
