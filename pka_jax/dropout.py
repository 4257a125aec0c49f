"""Dropout whose keep-mask costs a few integer operations per element.

`jax.random.bernoulli` draws its bits with Philox or threefry: about 10 ns an element on a CPU
core, which made dropout a quarter of the encoder's training step at the paper's shapes. Here
each call site draws two 32-bit words from the 'dropout' PRNG stream and hashes every element's
index with them (two keyed rounds of the `lowbias32` integer hash, a bijection on 32 bits with
near-ideal avalanche); XLA fuses the hash into the elementwise op that consumes the mask, so the
bits cost about what one more elementwise pass does (50x cheaper on CPU, no mask in memory).
`impl='jax'` keeps flax's `jax.random.bernoulli` masks.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

DROPOUT_IMPLS = ('hash', 'jax')


def _lowbias32(x: jax.Array) -> jax.Array:
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_bits(seed_2: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform uint32 bits for every element of `shape`, determined by the two words of `seed_2`."""
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  return _lowbias32(_lowbias32(index ^ seed_2[0]) + seed_2[1])


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...], impl: str = 'hash'
              ) -> jax.Array:
  """Boolean mask, each element True with probability `1 - rate`."""
  if impl == 'jax':
    return jax.random.bernoulli(rng, 1.0 - rate, shape)
  if impl != 'hash':
    raise ValueError(f'dropout impl {impl!r}: expected one of {DROPOUT_IMPLS}')
  # P(bits >= threshold) = 1 - threshold / 2**32, exact to 2**-32.
  threshold = jnp.uint32(min(round(rate * 2.0**32), 2**32 - 1))
  return hash_bits(jax.random.bits(rng, (2,), jnp.uint32), shape) >= threshold


class Dropout(nn.Module):
  """Inverted dropout at `rate` on the 'dropout' rng stream (identity when deterministic)."""

  rate: float
  deterministic: bool
  impl: str = 'hash'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    keep = keep_mask(self.make_rng('dropout'), self.rate, x.shape, self.impl)
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))
