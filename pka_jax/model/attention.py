"""Position schemes for causal self-attention: PKA kernels, masks, RoPE and CoPE.

PKA (docs/design.md §1) keeps positions out of the item vectors: a Toeplitz kernel `Tk` mixes the
inputs of the keys and a full lower-triangular kernel `F` the inputs of the values. Both are
lower triangular over input positions, so no output can see a later input.

The kernels can be applied on either side of the projections, with the same result:

* on the inputs, `K = (Tk X) Wk + bk`, `V = (F X) Wv + bv` (one `T×T` by `T×d` product per
  sequence); the form a fused attention kernel (cuDNN) takes;
* on the logits and weights, as the paper reads it: `logits = (Q K'ᵀ) U` with `K' = X Wk`
  and `U = Tkᵀ` (the key bias only shifts each row of logits, which the softmax ignores),
  and `out = (A F) V' + rowsum(A) bv` with `V' = X Wv`. The kernel
  products become plain `(B·H·Q) × T` by `T × T` matrix products with no transposes, and for
  one query row (evaluation) they cost `T²` instead of `T²·d`. Used by the plain path
  whenever it costs no more FLOPs (`num_heads · queries <= d`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pka_jax.kernels import attention as pallas_attention
from pka_jax.kernels import dispatch
from pka_jax.kernels import sharded
from pka_jax.model.dropout import Dropout, StandIns, Window

KERNEL_KINDS = ('none', 'toeplitz', 'full')


def _abs_normal(std: float):
  def init(key, shape, dtype=jnp.float32):
    return jnp.abs(std * jax.random.normal(key, shape, dtype))
  return init


def toeplitz_matrix(g_T: jax.Array) -> jax.Array:
  """`M[i, j] = g[i - j]` for `i >= j`, else 0.

  Built from copies, not a gather, so that its gradient is a sum over rows rather than a
  scatter-add of T² values into T slots (atomics that cost a GPU ~60 µs a block at T = 128).
  `size` copies of `r = (g[0], 0 × size, g[size-1], …, g[1])` laid end to end and read in rows
  of `2·size - 1` put `r[(j - i) mod 2·size]` at `(i, j)`: `g[i - j]` on and below the diagonal,
  a zero above it.
  """
  size = g_T.shape[0]
  r_2T = jnp.concatenate([g_T[:1], jnp.zeros(size, g_T.dtype), g_T[:0:-1]])
  rows = jnp.tile(r_2T, size)[:size * (2 * size - 1)].reshape(size, 2 * size - 1)
  return rows[:, :size]


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


def apply_kernel(kernel_QxT: jax.Array | None, x_BxTxD: jax.Array) -> jax.Array:
  """Mixes inputs over positions: row `i` of the result is `sum_j K[i, j] x[j]`."""
  if kernel_QxT is None:
    return x_BxTxD
  return jnp.einsum('ij,bjd->bid', kernel_QxT.astype(x_BxTxD.dtype), x_BxTxD)


def dot_rows(x: jax.Array, w_KxM: jax.Array, **kwargs) -> jax.Array:
  """`jnp.dot(x, w)` over `x`'s last axis, with its leading axes flattened to rows: the same
  values.

  The difference is in the gradient. From a `B×T×K` (or `B×H×Q×T`) `x`, the weight's
  gradient contracts two or three axes, and XLA on CPU first copies `x` transposed (again
  computing, inside that copy, whatever elementwise ops produced `x`); from rows it is one
  product of `x` and the cotangent as they lie. At the ML-1M shapes every train step ran
  ~15% faster this way (PKA and SASRec, 2-core CPU).
  """
  rows_NxK = x.reshape(-1, x.shape[-1])
  return jnp.dot(rows_NxK, w_KxM, **kwargs).reshape(*x.shape[:-1], w_KxM.shape[-1])


def visible_keys(num_queries: int, key_valid_BxT: jax.Array | None, size: int) -> jax.Array:
  """Boolean mask broadcastable to `B×1×Q×T`: query row `r` stands at position `T - Q + r`
  and sees key `j` iff `j` is not later (and, given `key_valid_BxT`, not padding)."""
  position_Qx1 = size - num_queries + jnp.arange(num_queries)[:, None]
  mask = (jnp.arange(size)[None, :] <= position_Qx1)[None, None]
  if key_valid_BxT is not None:
    mask = mask & key_valid_BxT[:, None, None, :]
  return mask


def attention_mask(valid_BxT: jax.Array, mask_padding_keys: bool) -> jax.Array:
  """Boolean `B×1×T×T` mask: key `j` is visible to query `i` iff `j <= i` (and `j` is real)."""
  size = valid_BxT.shape[1]
  mask = visible_keys(size, valid_BxT if mask_padding_keys else None, size)
  return jnp.broadcast_to(mask, (valid_BxT.shape[0], 1, size, size))


def rotary(x_BxTxHxK: jax.Array, first_position: int = 0, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding over the last axis (pairs of halves); axis 1 holds positions
  `first_position, first_position + 1, ...`."""
  size, dim = x_BxTxHxK.shape[1], x_BxTxHxK.shape[-1]
  if dim % 2:
    raise ValueError(f'rotary: head dimension {dim} must be even')
  inv_freq = base ** (-jnp.arange(0, dim // 2, dtype=jnp.float32) / (dim // 2))
  position_T = first_position + jnp.arange(size, dtype=jnp.float32)
  angle_TxK2 = position_T[:, None] * inv_freq[None, :]
  cos = jnp.cos(angle_TxK2)[None, :, None].astype(x_BxTxHxK.dtype)
  sin = jnp.sin(angle_TxK2)[None, :, None].astype(x_BxTxHxK.dtype)
  first, second = jnp.split(x_BxTxHxK, 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


class ContextualPosition(nn.Module):
  """Contextual positions (CoPE) as the authors' baseline defines them (docs/design.md §1).

  Gate `1 - sigmoid(logit[i, m])` for each visible key `m` (future keys gate 0); the position of
  key `j` seen from query `i` is the sum of gates over `j <= m <= i`, clamped to `maxlen - 1`.
  Per block and shared by the heads: the query passes `Linear(head_dim, head_dim)` and SiLU,
  then meets a `maxlen × head_dim` position table that starts at zeros (so an untrained model
  has no position signal), linearly interpolated between the floor and ceiling positions. The
  result is added to the logits.
  """

  maxlen: int

  @nn.compact
  def __call__(self, q_BxHxQxK, logits_BxHxQxT, mask_Bx1xQxT) -> jax.Array:
    head_dim = q_BxHxQxK.shape[-1]
    table_PxK = self.param('positions', nn.initializers.zeros, (self.maxlen, head_dim))
    query_BxHxQxK = nn.silu(
        Projection(head_dim, name='query')(q_BxHxQxK.astype(jnp.float32))[0])
    gates = jnp.where(mask_Bx1xQxT, 1.0 - jax.nn.sigmoid(logits_BxHxQxT), 0.0)
    position = jnp.flip(jnp.cumsum(jnp.flip(gates, -1), axis=-1), -1)
    position = jnp.clip(position, 0, self.maxlen - 1)
    floor = jnp.floor(position)
    weight_ceil = position - floor
    per_position_BxHxQxP = dot_rows(query_BxHxQxK, table_PxK.T)
    floor_i = floor.astype(jnp.int32)
    ceil_i = jnp.minimum(floor_i + 1, self.maxlen - 1)
    at_floor = jnp.take_along_axis(per_position_BxHxQxP, floor_i, axis=-1)
    at_ceil = jnp.take_along_axis(per_position_BxHxQxP, ceil_i, axis=-1)
    return (1.0 - weight_ceil) * at_floor + weight_ceil * at_ceil


class Declared(nn.Module):
  """Parameters declared as another module declares them (names, order, initialisers, so
  the same values and checkpoints), returned unapplied: for a kernel that applies several
  modules' parameters at once."""

  specs: tuple[tuple[str, Callable, tuple[int, ...]], ...]  # (name, initialiser, shape)

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    return {name: self.param(name, init, shape) for name, init, shape in self.specs}


def projection_specs(in_features: int, features: int) -> tuple:
  """`Projection`'s parameters, for `Declared`."""
  return (('kernel', nn.initializers.xavier_uniform(), (in_features, features)),
          ('bias', nn.initializers.zeros, (features,)))


class Projection(nn.Module):
  """`x W + b` over `x`'s last axis, with flax `Dense`'s parameters (and init order), the
  bias optional per call: kernels on the logits add the key and value biases outside the
  projection. Returns the product and the bias as stored (float32), which the product adds
  rounded to `dtype`."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, with_bias: bool = True
               ) -> tuple[jax.Array, jax.Array]:
    kernel = self.param('kernel', nn.initializers.xavier_uniform(),
                        (x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    y = dot_rows(x.astype(self.dtype), kernel.astype(self.dtype))
    return (y + bias.astype(self.dtype)[(None,) * (y.ndim - 1)] if with_bias else y), bias


def stand_in_logit_bias(stand_ins: StandIns) -> jax.Array:
  """Logit offsets `B×W` that make a row's stand-in columns, all one key, weigh as the
  `count` keys they stand for: `log(count / columns)` on them, 0 elsewhere."""
  columns_B = stand_ins.columns_BxT.sum(axis=1).astype(jnp.float32)
  copies_B = (jnp.log(stand_ins.count_B.astype(jnp.float32))
              - jnp.log(jnp.maximum(columns_B, 1.0)))
  return jnp.where(stand_ins.columns_BxT, copies_B[:, None], 0.0)


class CausalSelfAttention(nn.Module):
  """Multi-head causal attention with biases; PKA kernels, RoPE or CoPE on the logits.

  Queries are the last `Q` positions of the `T` keys (`Q = T` in training, 1 when only the
  newest position is scored). `k_kernel` and `v_kernel` are the `T×T` PKA kernels (or None).
  """

  num_heads: int
  dropout: float
  deterministic: bool
  rope: bool = False
  cope_maxlen: int = 0  # > 0 turns on contextual positions
  impl: str = 'plain'  # a dispatch.ATTENTION_IMPLS entry
  dtype: Any = jnp.float32
  dropout_impl: str = 'hash'
  kernels_on_logits: bool | None = None  # None: wherever it costs no more FLOPs
  # The step's mesh: the Pallas kernel runs on each device's share of the rows
  # (kernels/sharded.per_row_shard).
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, q_in_BxQxD, k_in_BxTxD, v_in_BxTxD, key_valid_BxT, *,
               k_kernel_TxT=None, v_kernel_TxT=None, first_position: int = 0,
               window: Window | None = None, padding: StandIns | None = None,
               out_projection_outside: bool = False) -> jax.Array | tuple[jax.Array, ...]:
    """`first_position`: the position of the first key (RoPE's angles start there);
    `window`: where the batch sits in the step's batch (dropout on the weights);
    `padding`: key columns that each stand for several identical keys of the full window,
    which their logits and dropout weigh in (plain path only; `stand_in_logit_bias`);
    `out_projection_outside`: return the heads `B×Q×D` before the output projection, and
    that projection's kernel and bias, for a kernel that applies it."""
    batch, num_queries, d = q_in_BxQxD.shape
    size = k_in_BxTxD.shape[1]
    if d % self.num_heads:
      raise ValueError(f'hidden size {d} is not divisible by {self.num_heads} heads')
    heads, head_dim = self.num_heads, d // self.num_heads
    impl = dispatch.attention(self.impl, self.dtype, contextual=bool(self.cope_maxlen),
                              weight_dropout=not self.deterministic and self.dropout > 0)
    fused = impl in ('xla', 'cudnn') and padding is None
    on_logits = not fused and (self.kernels_on_logits if self.kernels_on_logits is not None
                               else heads * num_queries <= d)
    k_on_logits = on_logits and k_kernel_TxT is not None
    v_on_logits = on_logits and v_kernel_TxT is not None

    def split_heads(x_BxTxD: jax.Array) -> jax.Array:
      return x_BxTxD.reshape(*x_BxTxD.shape[:2], heads, head_dim)

    def project(name, x_BxTxD, kernel_TxT, kernel_on_logits, bias_outside=False):
      if not kernel_on_logits:
        x_BxTxD = apply_kernel(kernel_TxT, x_BxTxD)
      y, bias = Projection(d, self.dtype, name=name)(
          x_BxTxD, with_bias=not (kernel_on_logits or bias_outside))
      # A bias added outside: by the plain path in the activations' dtype, or as stored by
      # the Pallas kernel, which rounds it as Projection does.
      bias = bias if bias_outside else bias.astype(self.dtype)
      return split_heads(y), bias.reshape(heads, head_dim)

    pallas = impl == 'pallas' and dispatch.pallas_attention_fits(
        dropout_impl=self.dropout_impl, stand_ins=padding is not None,
        kernels_on_logits=on_logits, whole_batch=window is None or window.rows_B is None,
        num_queries=num_queries, num_keys=size, head_dim=head_dim)
    # The Pallas kernel adds the query bias itself (one kernel fewer), unless RoPE turns the
    # queries first.
    query_bias_inside = pallas and not self.rope
    q_BxQxHxK, query_bias_HxK = project('query', q_in_BxQxD, None, False, query_bias_inside)
    k_BxTxHxK, _ = project('key', k_in_BxTxD, k_kernel_TxT, k_on_logits)
    v_BxTxHxK, value_bias_HxK = project('value', v_in_BxTxD, v_kernel_TxT, v_on_logits,
                                        pallas and v_on_logits)
    if self.rope:
      q_BxQxHxK = rotary(q_BxQxHxK, first_position=first_position + size - num_queries)
      k_BxTxHxK = rotary(k_BxTxHxK, first_position=first_position)
    mask_Bx1xQxT = visible_keys(num_queries, key_valid_BxT, size)
    scale = 1.0 / math.sqrt(head_dim)

    if pallas:
      out_BxQxHxK = self._pallas(q_BxQxHxK, k_BxTxHxK, v_BxTxHxK, key_valid_BxT, window,
                                 k_kernel_TxT if k_on_logits else None,
                                 v_kernel_TxT if v_on_logits else None,
                                 value_bias_HxK if v_on_logits else None, scale,
                                 query_bias_HxK if query_bias_inside else None)
    elif fused:
      mask = jnp.broadcast_to(mask_Bx1xQxT, (batch, 1, num_queries, size))
      out_BxQxHxK = jax.nn.dot_product_attention(
          q_BxQxHxK, k_BxTxHxK, v_BxTxHxK, mask=mask, scale=scale, implementation=impl)
    else:
      logits_BxHxQxT = jnp.einsum('bqhk,bthk->bhqt', q_BxQxHxK, k_BxTxHxK,
                                  preferred_element_type=jnp.float32)
      if k_on_logits:
        # q_i · (Tk K')_j = (S Tkᵀ)[i, j]. The key bias would add q_i · bk to every logit of
        # row i, a constant the softmax ignores: the logit form leaves it out.
        logits_BxHxQxT = dot_rows(logits_BxHxQxT.astype(self.dtype),
                                  k_kernel_TxT.T.astype(self.dtype),
                                  preferred_element_type=jnp.float32)
      logits_BxHxQxT = logits_BxHxQxT * scale
      if padding is not None:
        logits_BxHxQxT = logits_BxHxQxT + stand_in_logit_bias(padding)[:, None, None, :]
      if self.cope_maxlen:
        logits_BxHxQxT = logits_BxHxQxT + ContextualPosition(self.cope_maxlen, name='cope')(
            jnp.swapaxes(q_BxQxHxK, 1, 2), logits_BxHxQxT, mask_Bx1xQxT)
      # A finite floor, not -inf: a query with no visible key (only a padded position, whose
      # output the block zeroes) gets uniform weights instead of NaN.
      lowest = jnp.finfo(logits_BxHxQxT.dtype).min
      masked_BxHxQxT = jnp.where(mask_Bx1xQxT, logits_BxHxQxT, lowest)
      # On rows of a matrix: XLA's CPU runs a product summed over a shape with a dimension of
      # size 1 (one head) ~8x slower, and the softmax's gradient is one (jax 0.10.2).
      weights = jax.nn.softmax(masked_BxHxQxT.reshape(-1, size), axis=-1).reshape(
          masked_BxHxQxT.shape)
      # For figures (pka_jax/figures.py); free unless 'intermediates' is mutable.
      self.sow('intermediates', 'attention_weights', weights)
      weights_BxHxQxT = Dropout(self.dropout, self.deterministic, self.dropout_impl)(
          weights.astype(self.dtype), window, position_axes=(2, 3), stand_ins=padding)
      mixed_BxHxQxT = weights_BxHxQxT
      if v_on_logits:
        mixed_BxHxQxT = dot_rows(weights_BxHxQxT, v_kernel_TxT.astype(self.dtype))
      out_BxQxHxK = jnp.einsum('bhqt,bthk->bqhk', mixed_BxHxQxT, v_BxTxHxK)
      if v_on_logits:
        # Rows of A weigh the value bias by their sum (below 1 only under dropout).
        out_BxQxHxK = out_BxQxHxK + jnp.einsum(
            'bhq,hk->bqhk', weights_BxHxQxT.sum(axis=-1), value_bias_HxK)
    mixed_BxQxD = out_BxQxHxK.reshape(batch, num_queries, d)
    if out_projection_outside:
      out = Declared(projection_specs(d, d), name='out')()
      return mixed_BxQxD, out['kernel'], out['bias']
    return Projection(d, self.dtype, name='out')(mixed_BxQxD)[0]

  def _pallas(self, q, k, v, key_valid_BxT, window, k_kernel, v_kernel, value_bias, scale,
              query_bias):
    num_queries, size = q.shape[1], k.shape[1]
    full_q, full_t = (num_queries, size) if window is None else (window.maxlen,) * 2
    options = pallas_attention.Options(
        scale=scale, rate=self.dropout, full_q=full_q, off_q=full_q - num_queries,
        full_t=full_t, off_t=full_t - size, has_k_kernel=k_kernel is not None,
        has_v_kernel=v_kernel is not None, has_query_bias=query_bias is not None)
    # The plain path's Dropout_0 draws the same two words.
    seed_2 = Dropout(self.dropout, self.deterministic, self.dropout_impl).seed_words()

    def attend(*args, first_row, options):
      return pallas_attention.fused_attention(*args[:-1], options=options,
                                              query_bias_HxK=args[-1], first_row=first_row)

    return sharded.per_row_shard(
        attend, options, self.mesh,
        (q, k, v, k_kernel, v_kernel, value_bias, key_valid_BxT, seed_2, query_bias),
        rows=(True,) * 3 + (False,) * 3 + (True, False, False))
