"""PKA's training attention as one Pallas kernel per sequence and head (GPU, Triton).

With dropout on the attention weights, training cannot use cuDNN's fused attention, and XLA
runs the plain path (attention.py) as a dozen kernels a block, each writing and reading a
`B×H×Q×T` tensor: on an H200 at ML-1M's shapes that was a quarter of the step. Here one
program keeps a sequence's `Q×T` tiles on chip from the projected queries, keys and values
to the output, the kernels on the logits and weights included (not yet timed on a GPU):

    Q = Q' + bq,  S = Q K'ᵀ,  L = (S Tkᵀ)·scale (masked),  P = softmax(L),  W = dropout(P),
    out = (W F) V' + rowsum(W) bv

with the same hashed dropout masks as `dropout.Dropout` (the element's place in the step's
whole batch), so it trains exactly as the plain path does, to float rounding. The backward
kernel recomputes the tiles, softmax included (a query with no visible key has uniform
weights, which a saved log-sum-exp of `finfo.min` logits would lose). Each program writes
its own share of the kernels' and the biases' gradients, which XLA then adds.

Needs query and key counts and the head size that Triton's tiles take: powers of two, at
least 16 (`supports`). Off a GPU it runs in Pallas's interpreter, slowly, for checks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from pka_jax.kernels import sharded
from pka_jax.model import dropout as dropout_lib


@dataclasses.dataclass(frozen=True)
class Options:
  """What the kernels compute, fixed at trace time. The dropout index of an element `(b, h,
  r, t)` is `((b·H + h)·full_q + off_q + r)·full_t + off_t + t` (`dropout.Window.index`)."""
  scale: float
  rate: float
  full_q: int
  off_q: int
  full_t: int
  off_t: int
  has_k_kernel: bool
  has_v_kernel: bool
  has_query_bias: bool = False
  num_warps: int = 8
  num_stages: int = 1
  interpret: bool = False


def supports(num_queries: int, num_keys: int, head_dim: int) -> bool:
  """Whether Triton's tiles fit: every dimension a power of two, at least 16."""
  return all(n >= 16 and not n & (n - 1) for n in (num_queries, num_keys, head_dim))


def fused_attention(q_BxQxHxK, k_BxTxHxK, v_BxTxHxK, k_kernel_TxT, v_kernel_TxT,
                    value_bias_HxK, key_valid_BxT, seed_2, options: Options, first_row=0,
                    query_bias_HxK=None):
  """`out_BxQxHxK` of the formula above. A kernel that is None is the identity; so is a
  value bias of None (the values' bias then sits in `V'`), and a query bias of None (as
  `options.has_query_bias` says). Both biases come as stored and are rounded to the
  activations' dtype inside, as the plain path rounds them. `key_valid_BxT` None sees every
  key; `seed_2` is `Dropout`'s two words; `first_row` is the step's batch row of this
  batch's first (a data shard's), for the dropout index."""
  dtype = q_BxQxHxK.dtype
  heads, head_dim = k_BxTxHxK.shape[2:]
  if (query_bias_HxK is not None) != options.has_query_bias:
    raise ValueError('a query bias goes with options.has_query_bias')
  dummy = jnp.zeros((16, 16), dtype)
  valid = (jnp.ones(k_BxTxHxK.shape[:2], jnp.int32) if key_valid_BxT is None
           else key_valid_BxT.astype(jnp.int32))
  return _attention(
      q_BxQxHxK, (jnp.zeros((heads, head_dim), jnp.float32) if query_bias_HxK is None
                  else query_bias_HxK.astype(jnp.float32)), k_BxTxHxK, v_BxTxHxK,
      dummy if k_kernel_TxT is None else k_kernel_TxT.astype(dtype),
      dummy if v_kernel_TxT is None else v_kernel_TxT.astype(dtype),
      (jnp.zeros((heads, head_dim), jnp.float32) if value_bias_HxK is None
       else value_bias_HxK.astype(jnp.float32)),
      valid, jnp.concatenate([seed_2.astype(jnp.uint32),
                              jnp.asarray(first_row, jnp.uint32).reshape(1),
                              jnp.zeros((1,), jnp.uint32)]), options)


def _visible(rows: int, keys: int, valid_T):
  """Query row `r` stands at position `keys - rows + r` and sees the valid keys up to it."""
  row = jax.lax.broadcasted_iota(jnp.int32, (rows, keys), 0) + (keys - rows)
  key = jax.lax.broadcasted_iota(jnp.int32, (rows, keys), 1)
  return (key <= row) & (valid_T[None, :] != 0)


def _keep(seed_ref, shape, options: Options):
  """`Dropout`'s hashed keep-mask of this program's `Q×T` tile."""
  b, h = pl.program_id(0), pl.program_id(1)
  heads = pl.num_programs(1)
  b = b.astype(jnp.uint32) + seed_ref[2]  # the row in the step's batch
  row = jax.lax.broadcasted_iota(jnp.uint32, shape, 0) + jnp.uint32(options.off_q)
  key = jax.lax.broadcasted_iota(jnp.uint32, shape, 1) + jnp.uint32(options.off_t)
  block = b * jnp.uint32(heads) + h.astype(jnp.uint32)
  index = ((block * jnp.uint32(options.full_q) + row) * jnp.uint32(options.full_t) + key)
  bits = dropout_lib.hash_bits((seed_ref[0], seed_ref[1]), shape, index)
  return bits >= dropout_lib.keep_threshold(options.rate)


def _logits(q, k, k_kernel_ref, valid_T, options: Options):
  """`(S_c, L, visible)`: the products `S` in the activations' dtype, the masked, scaled
  logits, and the mask."""
  f32 = jnp.float32
  s = jnp.dot(q, k.T, preferred_element_type=f32)
  s_c = s.astype(q.dtype)
  if options.has_k_kernel:
    s = jnp.dot(s_c, k_kernel_ref[...].T, preferred_element_type=f32)
  logits = s * options.scale
  visible = _visible(q.shape[0], k.shape[0], valid_T)
  return s_c, jnp.where(visible, logits, jnp.finfo(f32).min), visible


def _softmax(logits):
  exp = jnp.exp(logits - jnp.max(logits, axis=1)[:, None])
  return exp / jnp.sum(exp, axis=1)[:, None]


def _dropped(p, keep, options: Options, dtype):
  """`Dropout`'s kept weights: rounded to `dtype`, then divided (in float32, as XLA divides
  16-bit floats; Triton has no 16-bit division) and rounded again."""
  rate = jnp.asarray(1.0 - options.rate, dtype).astype(jnp.float32)
  kept = (p.astype(dtype).astype(jnp.float32) / rate).astype(dtype)
  return jnp.where(keep, kept, jnp.zeros_like(kept))


def _queries(q_ref, q_bias_ref, options: Options):
  q = q_ref[...]
  return q + q_bias_ref[...].astype(q.dtype)[None, :] if options.has_query_bias else q


def _attention_kernel(seed_ref, q_ref, q_bias_ref, k_ref, v_ref, k_kernel_ref, v_kernel_ref,
                      bias_ref, valid_ref, out_ref, *, options: Options):
  q, k, v = _queries(q_ref, q_bias_ref, options), k_ref[...], v_ref[...]
  dtype = q.dtype
  _, logits, _ = _logits(q, k, k_kernel_ref, valid_ref[...], options)
  weights = _dropped(_softmax(logits), _keep(seed_ref, logits.shape, options), options, dtype)
  mixed = weights
  if options.has_v_kernel:
    mixed = jnp.dot(weights, v_kernel_ref[...], preferred_element_type=jnp.float32
                    ).astype(dtype)
  out = jnp.dot(mixed, v, preferred_element_type=jnp.float32)
  if options.has_v_kernel:
    bias = bias_ref[...].astype(dtype).astype(jnp.float32)
    out += jnp.sum(weights.astype(jnp.float32), axis=1)[:, None] * bias[None, :]
  out_ref[...] = out.astype(out_ref.dtype)


def _attention_grad_kernel(seed_ref, q_ref, q_bias_ref, k_ref, v_ref, k_kernel_ref,
                           v_kernel_ref, bias_ref, valid_ref, d_out_ref, dq_ref, dk_ref, dv_ref,
                           d_k_kernel_ref, d_v_kernel_ref, d_bias_ref, *, options: Options):
  f32 = jnp.float32
  q, k, v = _queries(q_ref, q_bias_ref, options), k_ref[...], v_ref[...]
  d_out = d_out_ref[...]
  dtype = q.dtype
  s_c, logits, visible = _logits(q, k, k_kernel_ref, valid_ref[...], options)
  p = _softmax(logits)
  keep = _keep(seed_ref, logits.shape, options)
  weights = _dropped(p, keep, options, dtype)
  mixed = weights
  if options.has_v_kernel:
    v_kernel = v_kernel_ref[...]
    mixed = jnp.dot(weights, v_kernel, preferred_element_type=f32).astype(dtype)
  dv_ref[...] = jnp.dot(mixed.T, d_out, preferred_element_type=f32).astype(dv_ref.dtype)
  d_mixed = jnp.dot(d_out, v.T, preferred_element_type=f32).astype(dtype)
  d_weights = d_mixed.astype(f32)
  if options.has_v_kernel:
    d_weights = jnp.dot(d_mixed, v_kernel.T, preferred_element_type=f32)
    d_v_kernel_ref[...] = jnp.dot(weights.T, d_mixed, preferred_element_type=f32)
    bias = bias_ref[...].astype(dtype).astype(f32)
    # out += rowsum(W) bv: each weight of row r gets d_out[r] · bv.
    d_weights += jnp.sum(d_out.astype(f32) * bias[None, :], axis=1)[:, None]
    d_bias_ref[0, :] = jnp.sum(jnp.sum(weights.astype(f32), axis=1)[:, None]
                               * d_out.astype(f32), axis=0)
  else:  # nothing to learn: the dummy kernel and the zero bias stand in
    d_v_kernel_ref[...] = jnp.zeros(d_v_kernel_ref.shape, f32)
    d_bias_ref[0, :] = jnp.zeros(d_bias_ref.shape[1:], f32)
  d_p = jnp.where(keep, d_weights / (1.0 - options.rate), 0.0)
  # Masked logits are constants: a query with no visible key has uniform weights, but no
  # gradient reaches its logits.
  d_logits = jnp.where(visible, p * (d_p - jnp.sum(d_p * p, axis=1)[:, None]), 0.0
                       ) * options.scale
  if options.has_k_kernel:
    d_logits_c = d_logits.astype(dtype)
    d_k_kernel_ref[...] = jnp.dot(d_logits_c.T, s_c, preferred_element_type=f32)
    d_s = jnp.dot(d_logits_c, k_kernel_ref[...], preferred_element_type=f32)
  else:
    d_k_kernel_ref[...] = jnp.zeros(d_k_kernel_ref.shape, f32)
    d_s = d_logits
  d_s_c = d_s.astype(dtype)
  dq = jnp.dot(d_s_c, k, preferred_element_type=f32).astype(dq_ref.dtype)
  dq_ref[...] = dq
  # The query bias's share: the rows' sum of its gradient (zero where the kernel has none).
  d_bias_ref[1, :] = (jnp.sum(dq.astype(f32), axis=0) if options.has_query_bias
                      else jnp.zeros(d_bias_ref.shape[1:], f32))
  dk_ref[...] = jnp.dot(d_s_c.T, q, preferred_element_type=f32).astype(dk_ref.dtype)


def _specs(q, k, k_kernel, v_kernel):
  """Block specs over grid `(b, h)`: the sequence's tiles of one head, the whole kernels."""
  rows, (keys, _, head_dim) = q.shape[1], k.shape[1:]
  whole = lambda x: pl.BlockSpec(x.shape, lambda b, h: (0,) * x.ndim)
  return {
      'seed': pl.BlockSpec((4,), lambda b, h: (0,)),  # two words, first row, padding
      'q': pl.BlockSpec((None, rows, None, head_dim), lambda b, h: (b, 0, h, 0)),
      'k': pl.BlockSpec((None, keys, None, head_dim), lambda b, h: (b, 0, h, 0)),
      'k_kernel': whole(k_kernel), 'v_kernel': whole(v_kernel),
      'bias': pl.BlockSpec((None, head_dim), lambda b, h: (h, 0)),
      'valid': pl.BlockSpec((None, keys), lambda b, h: (b, 0)),
  }


def _call(kernel, grid, in_specs, out_specs, out_shape, options: Options):
  return pl.pallas_call(
      functools.partial(kernel, options=options), grid=grid, in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, interpret=options.interpret,
      compiler_params=None if options.interpret else pallas_triton.CompilerParams(
          num_warps=options.num_warps, num_stages=options.num_stages),
      name=kernel.__name__.strip('_'))


def _like(x, shape=None, dtype=None):
  return sharded.varying_like(x, x.shape if shape is None else shape, dtype or x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _attention(q, q_bias, k, v, k_kernel, v_kernel, bias, valid, seed, options):
  return _attention_forward(q, q_bias, k, v, k_kernel, v_kernel, bias, valid, seed,
                            options)[0]


def _attention_forward(q, q_bias, k, v, k_kernel, v_kernel, bias, valid, seed, options):
  batch, _, heads, _ = q.shape
  spec = _specs(q, k, k_kernel, v_kernel)
  out = _call(
      _attention_kernel, (batch, heads),
      [spec['seed'], spec['q'], spec['bias'], spec['k'], spec['k'], spec['k_kernel'],
       spec['v_kernel'], spec['bias'], spec['valid']], spec['q'], _like(q), options,
  )(seed, q, q_bias, k, v, k_kernel, v_kernel, bias, valid)
  return out, (q, q_bias, k, v, k_kernel, v_kernel, bias, valid, seed)


def _attention_backward(options, residuals, d_out):
  q, q_bias, k, v, k_kernel, v_kernel, bias, valid, seed = residuals
  batch, _, heads, _ = q.shape
  spec = _specs(q, k, k_kernel, v_kernel)
  f32 = jnp.float32
  per_program = lambda x: pl.BlockSpec((None, None, *x.shape), lambda b, h: (b, h, 0, 0))
  dq, dk, dv, d_k_kernel, d_v_kernel, d_bias = _call(
      _attention_grad_kernel, (batch, heads),
      [spec['seed'], spec['q'], spec['bias'], spec['k'], spec['k'], spec['k_kernel'],
       spec['v_kernel'], spec['bias'], spec['valid'], spec['q']],
      (spec['q'], spec['k'], spec['k'], per_program(k_kernel), per_program(v_kernel),
       pl.BlockSpec((None, None, 2, bias.shape[1]), lambda b, h: (b, h, 0, 0))),
      (_like(q), _like(k), _like(v), _like(k_kernel, (batch, heads, *k_kernel.shape), f32),
       _like(v_kernel, (batch, heads, *v_kernel.shape), f32),
       _like(bias, (batch, heads, 2, bias.shape[1]), f32)), options,
  )(seed, q, q_bias, k, v, k_kernel, v_kernel, bias, valid, d_out)
  d_value_bias, d_query_bias = d_bias.sum(axis=0).swapaxes(0, 1)  # each heads × head_dim
  return (dq, d_query_bias, dk, dv, d_k_kernel.sum(axis=(0, 1)).astype(k_kernel.dtype),
          d_v_kernel.sum(axis=(0, 1)).astype(v_kernel.dtype), d_value_bias, None, None)


_attention.defvjp(_attention_forward, _attention_backward)
