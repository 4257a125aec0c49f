"""LayerNorm as one Pallas kernel forward and one backward (GPU, Triton).

XLA runs flax's LayerNorm on a GPU as three kernels forward (the row sums, `rsqrt` of the
variance, the normalised rows) and four or five backward, most of them links in the longest
chain of dependent kernels (experiments/kernels/gpu_kernels.py: 40 of the 98 in ML-1M's
bfloat16 step with the Pallas loss and attention). Here each program normalises a block of rows:

    y = (x - mean) · scale · rsqrt(var + eps) + bias,   var = mean(x²) - mean²

in float32 whatever the activations' dtype, as flax computes it (`use_fast_variance`), and
keeps each row's mean and `rsqrt` for the backward kernel, which writes the rows' gradient
and each block's share of the scale's and bias's gradients (XLA adds the shares):

    x̂ = (x - mean)·r,  g = dy·scale,  dx = r·(g - mean(g) - x̂·mean(g·x̂))

Rows must come in blocks of 16 to 64 (`block_rows_for`) and the width must be a power of two
of at least 16 (`supports`). Off a GPU it runs in Pallas's interpreter, slowly, for checks.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from pka_jax import sharding
from pka_jax.kernels import sharded


MAX_BLOCK_ROWS = 64


@dataclasses.dataclass(frozen=True)
class Options:
  epsilon: float
  block_rows: int  # rows a program takes: block_rows_for(rows)
  num_warps: int = 4
  interpret: bool = False


def block_rows_for(rows: int) -> int:
  """The largest power of two up to MAX_BLOCK_ROWS, and at least 16, that divides `rows`;
  0 if none does."""
  block = MAX_BLOCK_ROWS
  while block >= 16 and rows % block:
    block //= 2
  return block if block >= 16 else 0


def supports(rows: int, width: int) -> bool:
  """Whether Triton's tiles fit: blocks of rows, a width of a power of two >= 16."""
  return block_rows_for(rows) > 0 and width >= 16 and not width & (width - 1)


def layer_norm(x_NxD: jax.Array, scale_D: jax.Array, bias_D: jax.Array, options: Options
               ) -> jax.Array:
  """flax's `LayerNorm` of the rows of `x_NxD`, in `x_NxD`'s dtype."""
  return _layer_norm(x_NxD, scale_D.astype(jnp.float32), bias_D.astype(jnp.float32), options)


def stats(x):
  """Each row's mean and variance, as flax's LayerNorm computes them (`use_fast_variance`)."""
  mean = jnp.mean(x, axis=1)
  variance = jnp.maximum(jnp.mean(x * x, axis=1) - mean * mean, 0.0)
  return mean, variance


def _layer_norm_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, epsilon):
  x = x_ref[...].astype(jnp.float32)
  mean, variance = stats(x)
  rstd = jax.lax.rsqrt(variance + epsilon)
  y = (x - mean[:, None]) * (scale_ref[...][None, :] * rstd[:, None]) + bias_ref[...][None, :]
  y_ref[...] = y.astype(y_ref.dtype)
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def _layer_norm_grad_kernel(x_ref, scale_ref, mean_ref, rstd_ref, dy_ref, dx_ref, shares_ref):
  f32 = jnp.float32
  rstd = rstd_ref[...][:, None]
  x_hat = (x_ref[...].astype(f32) - mean_ref[...][:, None]) * rstd
  dy = dy_ref[...].astype(f32)
  g = dy * scale_ref[...][None, :]
  dx = rstd * (g - jnp.mean(g, axis=1)[:, None]
               - x_hat * jnp.mean(g * x_hat, axis=1)[:, None])
  dx_ref[...] = dx.astype(dx_ref.dtype)
  shares_ref[0, :] = jnp.sum(dy * x_hat, axis=0)  # the scale's, then the bias's
  shares_ref[1, :] = jnp.sum(dy, axis=0)


def _call(kernel, x, in_specs, out_specs, out_shape, options: Options, **fixed):
  return pl.pallas_call(
      functools.partial(kernel, **fixed), grid=(x.shape[0] // options.block_rows,), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, interpret=options.interpret,
      compiler_params=None if options.interpret else pallas_triton.CompilerParams(
          num_warps=options.num_warps, num_stages=1),
      name=kernel.__name__.strip('_'))


def _specs(x, options: Options):
  width, block = x.shape[1], options.block_rows
  return {'rows': pl.BlockSpec((block, width), lambda i: (i, 0)),
          'per_row': pl.BlockSpec((block,), lambda i: (i,)),
          'vector': pl.BlockSpec((width,), lambda i: (0,)),
          'shares': pl.BlockSpec((None, 2, width), lambda i: (i, 0, 0))}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, options):
  return _forward(x, scale, bias, options)[0]


def _forward(x, scale, bias, options):
  spec = _specs(x, options)
  per_row = jax.ShapeDtypeStruct(x.shape[:1], jnp.float32)
  y, mean, rstd = _call(
      _layer_norm_kernel, x, [spec['rows'], spec['vector'], spec['vector']],
      (spec['rows'], spec['per_row'], spec['per_row']),
      (jax.ShapeDtypeStruct(x.shape, x.dtype), per_row, per_row), options,
      epsilon=options.epsilon)(x, scale, bias)
  return y, (x, scale, mean, rstd)


def _backward(options, residuals, dy):
  x, scale, mean, rstd = residuals
  spec = _specs(x, options)
  blocks = x.shape[0] // options.block_rows
  dx, shares = _call(
      _layer_norm_grad_kernel, x,
      [spec['rows'], spec['vector'], spec['per_row'], spec['per_row'], spec['rows']],
      (spec['rows'], spec['shares']),
      (jax.ShapeDtypeStruct(x.shape, x.dtype),
       jax.ShapeDtypeStruct((blocks, 2, x.shape[1]), jnp.float32)), options,
  )(x, scale, mean, rstd, dy)
  d_scale, d_bias = shares.sum(axis=0)
  return dx, d_scale, d_bias


_layer_norm.defvjp(_forward, _backward)


class PallasLayerNorm(nn.Module):
  """flax's `nn.LayerNorm` (the same parameters, so checkpoints are interchangeable) by the
  Pallas kernels: Triton where the program is compiled for a GPU, Pallas's interpreter
  elsewhere; flax's own where the rows do not fit the kernels' tiles. On several devices
  each normalises its own rows (`shard_map`)."""

  epsilon: float
  dtype: jnp.dtype
  mesh: jax.sharding.Mesh | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    params = {'scale': self.param('scale', nn.initializers.ones, (width,)),
              'bias': self.param('bias', nn.initializers.zeros, (width,))}
    shards = sharding.row_shards(self.mesh, x.shape[0])
    rows = x.size // width // shards  # a device's
    if x.shape[0] % shards or not supports(rows, width):
      return nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype).apply({'params': params}, x)
    options = Options(self.epsilon, block_rows_for(rows))

    def normalise(x, scale, bias, first_row, options):
      del first_row  # rows are normalised alike wherever they sit
      return layer_norm(x.reshape(-1, width), scale, bias, options).reshape(x.shape)

    return sharded.per_row_shard(
        normalise, options, self.mesh, (x, params['scale'], params['bias']),
        rows=(True, False, False)).astype(self.dtype)
