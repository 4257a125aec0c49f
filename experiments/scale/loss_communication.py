"""Which item-sharded loss compiles to the least communication: shard_map or XLA's partitioner.

  python -m experiments.scale.loss_communication --num_items=100000 --devices=8 --mesh_model=4

Compiles the gradient of the full-catalog cross-entropy, the item table's rows split over the
'model' axis of a (data, model) mesh of simulated CPU devices, two ways: losses.
sharded_cross_entropy under shard_map (collectives written by hand), and the plain
full_cross_entropy with the same input shardings left to XLA's SPMD partitioner. Prints the
collectives of each optimised program and the bytes they move per device.
"""

import re

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from pka_jax import sharding
from pka_jax.model import item_table
from pka_jax.training import losses

_NUM_ITEMS = flags.DEFINE_integer('num_items', 100_000, 'Catalog size.')
_DEVICES = flags.DEFINE_integer('devices', 8, 'Simulated CPU devices.')
_MESH_MODEL = flags.DEFINE_integer('mesh_model', 4, "Devices on the 'model' axis.")
_POSITIONS = flags.DEFINE_integer('positions', 256 * 128, 'Positions a step (B·T).')
_DIM = flags.DEFINE_integer('dim', 128, 'd.')
_BLOCK = flags.DEFINE_integer('block_size', 4096, 'Items a block (the shard_map loss).')

_COLLECTIVE = re.compile(
    r'= (\w+)\[([\d,]*)\][^=]*? (all-reduce|all-gather|reduce-scatter|all-to-all|'
    r'collective-permute)(?:-start)?\(')
_BYTES = {'f32': 4, 'bf16': 2, 's32': 4, 'u32': 4, 'pred': 1}


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
  """{kind: (count, bytes of their results)} in an optimised HLO module."""
  found = {}
  for dtype, dims, kind in _COLLECTIVE.findall(hlo_text):
    size = _BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(',') if d] or [1]))
    count, total = found.get(kind, (0, 0))
    found[kind] = (count + 1, total + size)
  return found


def main(argv):
  del argv
  jax.config.update('jax_num_cpu_devices', _DEVICES.value)
  mesh = sharding.make_mesh(_MESH_MODEL.value, jax.devices()[:_DEVICES.value])
  rows = item_table.table_rows(_NUM_ITEMS.value, _MESH_MODEL.value)
  positions, dim = _POSITIONS.value, _DIM.value
  hidden = jax.ShapeDtypeStruct((positions // 128, 128, dim), jnp.float32,
                                sharding=NamedSharding(mesh, P(sharding.DATA)))
  table = jax.ShapeDtypeStruct((rows, dim), jnp.float32,
                               sharding=NamedSharding(mesh, P(sharding.MODEL)))
  targets = jax.ShapeDtypeStruct((positions // 128, 128), jnp.int32,
                                 sharding=NamedSharding(mesh, P(sharding.DATA)))

  def by_shard_map(h, e, t):
    def per_device(h, e, t):
      e = jax.lax.pcast(e, sharding.DATA, to='varying')
      total, _ = losses.sharded_cross_entropy(h, e, t, num_items=_NUM_ITEMS.value,
                                              block_size=_BLOCK.value)
      return jax.lax.psum(total, sharding.DATA)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P('data'), P('model'), P('data')),
                         out_specs=P())(h, e, t)

  def by_partitioner(h, e, t):
    return losses.full_cross_entropy(h, e[:_NUM_ITEMS.value + 1], t)[0]

  for name, loss in (('shard_map', by_shard_map), ('XLA partitioner', by_partitioner)):
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compiled = grad.lower(hidden, table, targets).compile()
    found = collectives(compiled.as_text())
    total = sum(size for _, size in found.values())
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f'{name:16s} {total / 2**20:9.1f} MiB of collectives a device '
          f'({", ".join(f"{n} {k}" for k, (n, _) in sorted(found.items()))}); '
          f'temporaries {temp / 2**20:,.0f} MiB')


if __name__ == '__main__':
  app.run(main)
