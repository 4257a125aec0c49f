"""Running a Pallas kernel on a mesh: each device on its own rows of the batch, and output
types that vary over shard_map's axes as its inputs do."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec as P

from pka_jax import sharding


def per_row_shard(kernel: Callable, options, mesh: Mesh | None, operands: Sequence,
                         rows: Sequence[bool]) -> jax.Array:
  """`kernel(*operands, first_row=..., options=...)` of a Pallas kernel: Triton where the
  program is compiled for a GPU, Pallas's interpreter elsewhere (`options.interpret`).

  On a mesh that splits the rows (`row_axes`) each device runs it on its own rows (jit would
  run a custom call on the whole batch on every device): the operands marked in `rows` are
  split by their first axis, the others whole, and `first_row` is the step's batch row of
  the device's first (0 without shards). The whole operands' gradients, per shard, are
  summed by shard_map's transpose.
  """

  def run(*operands, first_row):
    def call(interpret):
      return lambda *args: kernel(*args[:-1], first_row=args[-1],
                                  options=dataclasses.replace(options, interpret=interpret))
    return jax.lax.platform_dependent(*operands, first_row, cuda=call(False),
                                      default=call(True))

  batch = next(x for x, split in zip(operands, rows) if split).shape[0]
  shards = sharding.row_shards(mesh, batch)
  if shards == 1:
    return run(*operands, first_row=0)
  axes = sharding.row_axes(mesh, batch)

  def per_shard(*operands):
    return run(*operands, first_row=jax.lax.axis_index(axes) * (batch // shards))

  # Unchecked: Pallas's interpreter (the CPU's checks) loses the varying axes of its refs.
  return jax.shard_map(per_shard, mesh=mesh,
                       in_specs=tuple(P(axes) if split else P() for split in rows),
                       out_specs=P(axes), check_vma=False)(*operands)


def varying_like(x: jax.Array, shape, dtype) -> jax.ShapeDtypeStruct:
  """An output type of `shape` and `dtype` that varies over shard_map's axes as `x` does: a
  Pallas kernel's outputs inside the data-parallel step. Earlier jax releases call the field
  `vma`."""
  aval = jax.typeof(x)
  for field in ('manual_axis_type', 'vma'):
    if hasattr(aval, field):
      return jax.ShapeDtypeStruct(shape, dtype, **{field: getattr(aval, field)})
  return jax.ShapeDtypeStruct(shape, dtype)
