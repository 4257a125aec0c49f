"""Sizes a config's train step on a mesh before paying for the machines: per-device bytes.

  python experiments/plan.py --config=configs/yambda_listens.py --num_items=10_000_000 \
      --devices=8 --config.mesh_model=8
  python experiments/plan.py --config=configs/yambda_listens.py --num_items=10_000_000 \
      --devices=1

Simulates `--devices` CPU devices, builds the (data, model) mesh of `config.mesh_model`, and
compiles the real train step on abstract inputs (no data, no parameters in memory). Prints,
per device: the parameters and optimiser state (the item table's share apart), XLA's plan
for the compiled step (arguments, outputs, temporaries) and the largest array in the
optimised program; and the model FLOPs of a step (pka_jax/flops.py). Temporaries depend on
the loss's block of items (`ce_block_size`) and the backend's defaults: compiled for CPU here.
"""

import functools
import re

from absl import app
from absl import flags
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags
import numpy as np

from pka_jax import flops
from pka_jax import models
from pka_jax import sharding
from pka_jax import train

config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'Config file.')
_NUM_ITEMS = flags.DEFINE_integer('num_items', 10_000_000, 'Catalog size.')
_DEVICES = flags.DEFINE_integer('devices', 8, 'Simulated CPU devices (all in the mesh).')
FLAGS = flags.FLAGS

_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 's32': 4, 'u32': 4, 'f16': 2, 'pred': 1, 's8': 1, 'u8': 1}


def per_device_bytes(shapes, shardings) -> float:
  """Bytes one device holds of arrays `shapes` placed by `shardings`."""
  return sum(np.prod(placement.shard_shape(shape.shape)) * shape.dtype.itemsize
             for shape, placement in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def largest_array(hlo_text: str) -> tuple[str, int]:
  """The largest array shape in an optimised HLO module, with its bytes."""
  best = ('', 0)
  for dtype, dims in re.findall(r'\b(f32|bf16|s32|u32|f16|pred|s8|u8)\[([\d,]+)\]', hlo_text):
    size = _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(',')]))
    if size > best[1]:
      best = (f'{dtype}[{dims}]', size)
  return best


def main(argv):
  del argv
  jax.config.update('jax_num_cpu_devices', _DEVICES.value)
  config = FLAGS.config
  mesh = sharding.make_mesh(config.mesh_model, jax.devices()[:_DEVICES.value])
  model = models.create_model(config, _NUM_ITEMS.value, deterministic=False, mesh=mesh)
  init = functools.partial(train.create_train_state, model, config)
  state = jax.eval_shape(init, jax.random.key(0, impl=config.prng_impl))
  state_shardings = sharding.state_shardings(state, mesh)
  batch_sharding = NamedSharding(mesh, P(sharding.DATA))
  batch = {name: jax.ShapeDtypeStruct((config.batch_size, config.maxlen), np.int32,
                                      sharding=batch_sharding) for name in ('inputs', 'targets')}
  data_shards = mesh.shape[sharding.DATA]
  microbatches = config.microbatches or train.microbatches_for(
      config.batch_size // data_shards, config.maxlen)
  step = functools.partial(train.train_step, microbatches=microbatches, mesh=mesh,
                           **train.loss_options(config, _NUM_ITEMS.value))
  abstract_state = jax.tree.map(
      lambda s, placement: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=placement),
      state, state_shardings)
  rng = jax.random.key(0, impl=config.prng_impl)
  compiled = jax.jit(step, out_shardings=(state_shardings, NamedSharding(mesh, P())),
                     donate_argnums=0).lower(abstract_state, batch, rng).compile()
  memory = compiled.memory_analysis()

  table = per_device_bytes(state.params['item_emb'], state_shardings.params['item_emb'])
  params = per_device_bytes(state.params, state_shardings.params)
  optimizer = per_device_bytes(state.opt_state, state_shardings.opt_state)
  shape, size = largest_array(compiled.as_text())
  gib = lambda x: f'{x / 2**30:,.2f} GiB' if x >= 2**30 else f'{x / 2**20:,.1f} MiB'
  print(f'mesh        data {mesh.shape[sharding.DATA]} x model {mesh.shape[sharding.MODEL]} '
        f'({_DEVICES.value} simulated devices); {_NUM_ITEMS.value:,} items, d '
        f'{config.hidden_units}, batch {config.batch_size} x {config.maxlen}, '
        f'ce_block_size {config.ce_block_size}, {microbatches} microbatch(es)')
  print(f'per device  parameters {gib(params)} (item table {gib(table)}), optimiser state '
        f'{gib(optimizer)}')
  print(f'compiled    arguments {gib(memory.argument_size_in_bytes)}, outputs '
        f'{gib(memory.output_size_in_bytes)}, temporaries {gib(memory.temp_size_in_bytes)} '
        f'(aliased {gib(memory.alias_size_in_bytes)})')
  print(f'largest     {shape}: {gib(size)}')
  model_config = model.config
  print(f'FLOPs       {flops.train_step_flops(model_config, config.batch_size, config.loss):,} '
        'a step (model FLOPs, all devices)')


if __name__ == '__main__':
  app.run(main)
