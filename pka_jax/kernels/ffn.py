"""A block's second half as one Pallas kernel forward and one backward (GPU, Triton).

After attention, each block computes, row by row (encoder.Block):

    h = q_in + (o Wo + bo),  y = LayerNorm(h),  a = y W1 + b1,  u = dropout(relu(a)),
    f = u W2 + b2,  z = (y + dropout(f)) · valid

(`o` the attention's heads, `Wo, bo` its output projection), which XLA runs on a GPU as
about a dozen kernels forward and as many backward, eight of them links a block in the
longest chain of dependent kernels (experiments/kernels/gpu_kernels.py). Here a program takes a
block of rows through all of it with its three weights on chip, in the activations' dtype
where the XLA path rounds to it, LayerNorm's statistics in float32 as flax computes them,
and the very dropout masks of `dropout.Dropout` (each element's place in the step's batch).
The backward kernel writes the gradients of `q_in` (`dh`) and of `o` (`dh Woᵀ`) and the
products' output gradients `da`, `df`; the weights' gradients `oᵀ dh`, `yᵀ da`, `uᵀ df` are
products over all rows, which XLA computes off the chain; the biases and LayerNorm's scale and bias get per-block shares of
their gradients, which XLA adds.

Rows must come in blocks of 16 or 32 and the width must be a power of two from 16 to 128
(`supports`). Off a GPU it runs in Pallas's interpreter, slowly, for checks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from pka_jax.kernels import layer_norm as pallas_layer_norm
from pka_jax.model import dropout as dropout_lib

MAX_WIDTH = 128  # the three weights on chip
SHARES = 5  # per-block gradient shares: LayerNorm's scale and bias, three projections' biases
SHARE_ROWS = 8  # SHARES rounded up to Triton's power of two; the last rows are not written


@dataclasses.dataclass(frozen=True)
class Options:
  """What the kernels compute, fixed at trace time. The dropout index of element `(n, d)`
  of the `B·Q×D` rows is `((first_row + n // Q)·full_q + full_q - Q + n % Q)·D + d`
  (`dropout.Window.index` of the `B×Q×D` array, positions on axis 1)."""
  epsilon: float
  rate: float
  queries: int  # Q: the rows of one sequence
  full_q: int  # the window's full width (maxlen)
  block_rows: int  # block_rows_for(rows)
  num_warps: int = 8
  interpret: bool = False


def block_rows_for(rows: int) -> int:
  """16 or 32 rows a program, whichever divides `rows` (32 first); 0 if neither does. At
  ML-1M's width of 128, programs of 64 rows spill registers (ptxas, sm_90a, 8 warps)."""
  return next((block for block in (32, 16) if rows % block == 0), 0)


def supports(rows: int, width: int) -> bool:
  """Whether Triton's tiles fit: blocks of rows, a width of a power of two, 16 to 128."""
  return block_rows_for(rows) > 0 and 16 <= width <= MAX_WIDTH and not width & (width - 1)


def feed_forward(residual_NxD, mixed_NxD, w_proj_DxD, b_proj_D, valid_N, ln_scale_D, ln_bias_D,
                 w_in_DxD, b_in_D, w_out_DxD, b_out_D, seeds_2x2, options: Options,
                 first_row=0) -> jax.Array:
  """`z` of the formula above, in the rows' dtype: `residual` is `q_in`, `mixed` the
  attention's heads before its output projection `(w_proj, b_proj)`. `seeds_2x2` holds the
  two dropout call sites' words, in call order; `first_row` is the step's batch row of these
  rows' first sequence (a data shard's), for the dropout index."""
  dtype = residual_NxD.dtype
  f32 = jnp.float32
  seed = jnp.concatenate([seeds_2x2.reshape(4).astype(jnp.uint32),
                          jnp.asarray(first_row, jnp.uint32).reshape(1),
                          jnp.zeros((3,), jnp.uint32)])
  # Biases go in as float32, rounded in the kernels (a cast kernel each fewer); weights in
  # the activations' dtype, which every program reads.
  return _feed_forward(residual_NxD, mixed_NxD.astype(dtype), w_proj_DxD.astype(dtype),
                       b_proj_D.astype(f32), valid_N.astype(jnp.int32),
                       ln_scale_D.astype(f32), ln_bias_D.astype(f32), w_in_DxD.astype(dtype),
                       b_in_D.astype(f32), w_out_DxD.astype(dtype), b_out_D.astype(f32),
                       seed, options)


def _keep(seed_ref, site: int, shape, options: Options):
  """Call site `site`'s hashed keep-mask of this program's rows."""
  rows, width = shape
  row = (jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
         + (pl.program_id(0) * rows).astype(jnp.uint32))
  sequence = row // jnp.uint32(options.queries) + seed_ref[4]
  position = row % jnp.uint32(options.queries) + jnp.uint32(options.full_q - options.queries)
  column = jax.lax.broadcasted_iota(jnp.uint32, shape, 1)
  index = (sequence * jnp.uint32(options.full_q) + position) * jnp.uint32(width) + column
  bits = dropout_lib.hash_bits((seed_ref[2 * site], seed_ref[2 * site + 1]), shape, index)
  return bits >= dropout_lib.keep_threshold(options.rate)


def _kept_rate(options: Options, dtype):
  """`1 - rate` as `Dropout` divides by it: rounded to the activations' dtype."""
  return jnp.asarray(1.0 - options.rate, dtype).astype(jnp.float32)


def _dropout(x, keep, options: Options):
  """`Dropout` of `x`: divided in float32 (as XLA divides 16-bit floats; Triton has no 16-bit
  division), rounded back, zero where not kept. Also the transpose of itself."""
  if options.rate == 0.0:
    return x
  kept = (x.astype(jnp.float32) / _kept_rate(options, x.dtype)).astype(x.dtype)
  return jnp.where(keep, kept, jnp.zeros_like(kept))


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _plus_bias(x, bias_ref):
  """`x + b` as `Projection` adds it: the bias rounded to `x`'s dtype first."""
  return x + bias_ref[...].astype(x.dtype)[None, :]


def _ffn_kernel(seed_ref, residual_ref, mixed_ref, w_proj_ref, b_proj_ref, valid_ref,
                ln_scale_ref, ln_bias_ref, w_in_ref, b_in_ref, w_out_ref, b_out_ref, z_ref, h_ref,
                y_ref, u_ref, mean_ref, rstd_ref, *, options: Options):
  attended = _plus_bias(_dot(mixed_ref[...], w_proj_ref[...]), b_proj_ref)
  h = residual_ref[...] + attended
  dtype = h.dtype
  mean, variance = pallas_layer_norm.stats(h.astype(jnp.float32))
  rstd = jax.lax.rsqrt(variance + options.epsilon)
  y = ((h.astype(jnp.float32) - mean[:, None]) * (ln_scale_ref[...][None, :] * rstd[:, None])
       + ln_bias_ref[...][None, :]).astype(dtype)
  a = _plus_bias(_dot(y, w_in_ref[...]), b_in_ref)
  u = _dropout(jnp.maximum(a, jnp.zeros_like(a)), _keep(seed_ref, 0, a.shape, options), options)
  f = _plus_bias(_dot(u, w_out_ref[...]), b_out_ref)
  f = _dropout(f, _keep(seed_ref, 1, f.shape, options), options)
  z_ref[...] = (y + f) * valid_ref[...].astype(dtype)[:, None]
  h_ref[...] = h
  y_ref[...] = y
  u_ref[...] = u
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def _ffn_grad_kernel(seed_ref, valid_ref, ln_scale_ref, mean_ref, rstd_ref, h_ref, u_ref,
                     w_proj_ref, w_in_ref, w_out_ref, dz_ref, dh_ref, d_mixed_ref, da_ref,
                     df_ref, shares_ref, *, options: Options):
  f32 = jnp.float32
  dz = dz_ref[...]
  dtype = dz.dtype
  d_sum = dz * valid_ref[...].astype(dtype)[:, None]  # of y + dropout(f)
  df = _dropout(d_sum, _keep(seed_ref, 1, dz.shape, options), options)
  du = _dot(df, w_out_ref[...].T)
  # u > 0 exactly where the mask kept a positive `a`: the only places gradient passes.
  u = u_ref[...]
  da = jnp.where(u > 0, _dropout(du, True, options), jnp.zeros_like(du))
  dy = (_dot(da, w_in_ref[...].T) + d_sum).astype(f32)
  rstd = rstd_ref[...]
  x_hat = (h_ref[...].astype(f32) - mean_ref[...][:, None]) * rstd[:, None]
  g = dy * ln_scale_ref[...][None, :]
  dh = (rstd[:, None] * (g - jnp.mean(g, axis=1)[:, None]
                         - x_hat * jnp.mean(g * x_hat, axis=1)[:, None])).astype(dtype)
  dh_ref[...] = dh
  d_mixed_ref[...] = _dot(dh, w_proj_ref[...].T)
  da_ref[...] = da
  df_ref[...] = df
  # This block's shares of the gradients of LayerNorm's scale and bias, then of the biases
  # of the output projection, ffn_in and ffn_out (SHARES).
  for row, share in enumerate((dy * x_hat, dy, dh, da, df)):
    shares_ref[row, :] = jnp.sum(share.astype(f32), axis=0)


def _specs(rows_NxD, options: Options):
  width, block = rows_NxD.shape[1], options.block_rows
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  return {'seed': whole((8,)),
          'rows': pl.BlockSpec((block, width), lambda i: (i, 0)),
          'per_row': pl.BlockSpec((block,), lambda i: (i,)),
          'vector': whole((width,)), 'weight': whole((width, width)),
          'shares': pl.BlockSpec((None, SHARE_ROWS, width), lambda i: (i, 0, 0))}


def _call(kernel, rows_NxD, in_specs, out_specs, out_shape, options: Options):
  return pl.pallas_call(
      functools.partial(kernel, options=options),
      grid=(rows_NxD.shape[0] // options.block_rows,), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=options.interpret,
      compiler_params=None if options.interpret else pallas_triton.CompilerParams(
          num_warps=options.num_warps, num_stages=1),
      name=kernel.__name__.strip('_'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(12,))
def _feed_forward(residual, mixed, w_proj, b_proj, valid, ln_scale, ln_bias, w_in, b_in, w_out,
                  b_out, seed, options):
  return _forward(residual, mixed, w_proj, b_proj, valid, ln_scale, ln_bias, w_in, b_in, w_out,
                  b_out, seed, options)[0]


def _forward(residual, mixed, w_proj, b_proj, valid, ln_scale, ln_bias, w_in, b_in, w_out,
             b_out, seed, options):
  spec = _specs(residual, options)
  rows = jax.ShapeDtypeStruct(residual.shape, residual.dtype)
  per_row = jax.ShapeDtypeStruct(residual.shape[:1], jnp.float32)
  z, h, y, u, mean, rstd = _call(
      _ffn_kernel, residual,
      [spec['seed'], spec['rows'], spec['rows'], spec['weight'], spec['vector'],
       spec['per_row'], spec['vector'], spec['vector'], spec['weight'], spec['vector'],
       spec['weight'], spec['vector']],
      (spec['rows'],) * 4 + (spec['per_row'],) * 2, (rows,) * 4 + (per_row,) * 2, options,
  )(seed, residual, mixed, w_proj, b_proj, valid, ln_scale, ln_bias, w_in, b_in, w_out, b_out)
  return z, (mixed, valid, ln_scale, mean, rstd, h, y, u, w_proj, w_in, w_out, seed)


def _backward(options, residuals, dz):
  mixed, valid, ln_scale, mean, rstd, h, y, u, w_proj, w_in, w_out, seed = residuals
  spec = _specs(h, options)
  rows = jax.ShapeDtypeStruct(h.shape, h.dtype)
  blocks = h.shape[0] // options.block_rows
  dh, d_mixed, da, df, shares = _call(
      _ffn_grad_kernel, h,
      [spec['seed'], spec['per_row'], spec['vector'], spec['per_row'], spec['per_row'],
       spec['rows'], spec['rows'], spec['weight'], spec['weight'], spec['weight'],
       spec['rows']],
      (spec['rows'],) * 4 + (spec['shares'],),
      (rows,) * 4 + (jax.ShapeDtypeStruct((blocks, SHARE_ROWS, h.shape[1]), jnp.float32),),
      options,
  )(seed, valid, ln_scale, mean, rstd, h, u, w_proj, w_in, w_out, dz)
  d_ln_scale, d_ln_bias, d_b_proj, d_b_in, d_b_out = shares[:, :SHARES].sum(axis=0)
  # The weights' gradients as autodiff transposes `x W`, in the activations' dtype.
  return (dh, d_mixed, mixed.T @ dh, d_b_proj, None, d_ln_scale, d_ln_bias, y.T @ da, d_b_in,
          u.T @ df, d_b_out, None)


_feed_forward.defvjp(_forward, _backward)
