"""Dropout whose keep-mask costs a few integer operations per element.

`jax.random.bernoulli` draws its bits with Philox or threefry: about 10 ns an element on a CPU
core, which made dropout a quarter of the encoder's training step at the paper's shapes. Here
each call site draws two 32-bit words from the 'dropout' PRNG stream and hashes every element's
index with them (two keyed rounds of the `lowbias32` integer hash, a bijection on 32 bits with
near-ideal avalanche); XLA fuses the hash into the elementwise op that consumes the mask, so the
bits cost about what one more elementwise pass does (50x cheaper on CPU, no mask in memory).
`impl='jax'` keeps flax's `jax.random.bernoulli` masks.

A hashed mask is a function of each element's place in the step's whole batch at full width
(`Window`), not in the array at hand: microbatches and trimmed windows draw the very masks the
whole batch would, so neither changes a run, only its speed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

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


@dataclasses.dataclass(frozen=True)
class Window:
  """Where a batch's elements sit in the step's whole batch: its rows are rows `rows_B` of it
  (a microbatch; all rows in order if None), and a window `W <= maxlen` positions wide is the
  right end of the `maxlen` wide one (a trimmed batch)."""

  maxlen: int
  rows_B: jax.Array | None = None

  def index(self, shape: tuple[int, ...], position_axes: Sequence[int]) -> jax.Array:
    """uint32 row-major index of every element of an array of `shape` (rows first) in the
    whole batch's array, whose `position_axes` are `maxlen` long. With all rows and full
    windows it is the flat index of the array itself."""
    if self.rows_B is None:
      index = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    else:
      rows = self.rows_B.astype(jnp.uint32).reshape((-1,) + (1,) * (len(shape) - 1))
      index = jnp.broadcast_to(rows, shape)
    for axis in range(1, len(shape)):
      full = self.maxlen if axis in position_axes else shape[axis]
      coordinate = jax.lax.broadcasted_iota(jnp.uint32, shape, axis) + jnp.uint32(
          full - shape[axis])
      index = index * jnp.uint32(full) + coordinate
    return index


def hash_bits(seed_2: jax.Array, shape: tuple[int, ...], index: jax.Array | None = None
              ) -> jax.Array:
  """Uniform uint32 bits for every element of `shape`, determined by the two words of `seed_2`
  and the element's `index` (uint32, its flat index by default)."""
  if index is None:
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  return _lowbias32(_lowbias32(index ^ seed_2[0]) + seed_2[1])


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...], impl: str = 'hash',
              index: jax.Array | None = None) -> jax.Array:
  """Boolean mask, each element True with probability `1 - rate`; `index` as `hash_bits`'s."""
  if impl == 'jax':
    return jax.random.bernoulli(rng, 1.0 - rate, shape)
  if impl != 'hash':
    raise ValueError(f'dropout impl {impl!r}: expected one of {DROPOUT_IMPLS}')
  return _hashed_keep(_seed_words(rng), rate, shape, index)


def _seed_words(rng: jax.Array) -> jax.Array:
  return jax.random.bits(rng, (2,), jnp.uint32)


def keep_threshold(rate: float) -> jax.Array:
  """Hashed bits at or above this are kept: P(bits >= threshold) = 1 - threshold / 2**32,
  `1 - rate` to 2**-32."""
  return jnp.uint32(min(round(rate * 2.0**32), 2**32 - 1))


def _hashed_keep(seed_2: jax.Array, rate: float, shape: tuple[int, ...],
                 index: jax.Array | None = None) -> jax.Array:
  return hash_bits(seed_2, shape, index) >= keep_threshold(rate)


@dataclasses.dataclass(frozen=True)
class StandIns:
  """Key columns of a trimmed window that stand for more keys of the full one: in row `b`,
  the columns `columns_BxT` marks stand, together, for the first `count_B[b]` key positions
  of its maxlen wide window (identical padding keys, encoder.Encoder)."""

  columns_BxT: jax.Array
  count_B: jax.Array


def _kept_share(seed_2: jax.Array, rate: float, shape: tuple[int, ...], window: Window,
                position_axes: Sequence[int], stand_ins: StandIns) -> jax.Array:
  """For each element of `shape` but its last (key) axis: the share of the full window's
  first `count_B` keys that the hashed mask keeps, shape `shape[:-1] + (1,)`."""
  full_shape = (*shape[:-1], window.maxlen)
  keep = _hashed_keep(seed_2, rate, full_shape, window.index(full_shape, position_axes))
  count = stand_ins.count_B.reshape((-1,) + (1,) * (len(shape) - 1))
  first = jax.lax.broadcasted_iota(jnp.int32, full_shape, len(shape) - 1) < count
  kept = jnp.sum(keep & first, axis=-1, keepdims=True, dtype=jnp.int32)
  return kept.astype(jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32)


class Dropout(nn.Module):
  """Inverted dropout at `rate` on the 'dropout' rng stream (identity when deterministic).

  Given a `window`, hashed masks follow each element's place in the whole batch: `x`'s rows
  are its batch's rows and `position_axes` its positions (`Window.index`). With `stand_ins`
  (x's last axis holding keys), each column that stands for several keys of the full window
  keeps the share of them that the full window's masks keep: the sum over those keys of
  their dropped weights, which are all the same, is then the full window's."""

  rate: float
  deterministic: bool
  impl: str = 'hash'

  def seed_words(self) -> jax.Array:
    """The two words this call site's hashed masks hash with: what `__call__` draws from the
    'dropout' stream, for a fused kernel that draws the masks itself."""
    return _seed_words(self.make_rng('dropout'))

  @nn.compact
  def __call__(self, x: jax.Array, window: Window | None = None,
               position_axes: Sequence[int] = (1,), stand_ins: StandIns | None = None
               ) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    index = None if window is None else window.index(x.shape, position_axes)
    if stand_ins is None:
      keep = keep_mask(self.make_rng('dropout'), self.rate, x.shape, self.impl, index)
      return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))
    if self.impl != 'hash' or window is None:
      raise ValueError('keys that stand for others need hashed dropout masks and a window')
    seed_2 = _seed_words(self.make_rng('dropout'))
    keep = _hashed_keep(seed_2, self.rate, x.shape, index)
    share = _kept_share(seed_2, self.rate, x.shape, window, position_axes, stand_ins)
    columns = stand_ins.columns_BxT.reshape(
        (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))
    kept = x / jnp.asarray(1.0 - self.rate, x.dtype)
    return jnp.where(columns, kept * share.astype(x.dtype),
                     jnp.where(keep, kept, jnp.zeros_like(x)))
