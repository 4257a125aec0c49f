"""Sizes a config's train step on a mesh before paying for the machines: per-device bytes.

  python -m experiments.scale.plan --config=configs/yambda_listens.py --num_items=10_000_000 \
      --devices=8 --config.mesh_model=8
  python -m experiments.scale.plan --config=configs/yambda_listens.py --num_items=10_000_000 \
      --devices=1
  python -m experiments.scale.plan --config=configs/ml1m.py --num_items=3416 \
      --config.dtype=bfloat16 --tpu=v5p:2x2x2  # pip install 'libtpu==0.0.42.*' first

Builds the (data, model) mesh of `config.mesh_model` over `--devices` simulated CPU devices,
or over the chips of a Cloud TPU slice (`--tpu`, libtpu's topology names: `v5e:2x2` is four
v5e chips on one host, `v5p:2x2x2` eight v5p chips on two), and compiles the real train step
on abstract inputs (no data, no parameters in memory, no TPU: libtpu compiles without one,
every host of the slice included). Prints, per device: the parameters and optimiser state
(the item table's share apart), XLA's plan for the compiled step (arguments, outputs,
temporaries) and the largest array in the optimised program, XLA's plan for the evaluation
step (a batch of full windows), and the model FLOPs of a step (pka_jax/model/flops.py).
Temporaries depend on the loss's block of items (`ce_block_size`) and on the backend, whose
defaults the steps take (a CPU splits the batch in microbatches, an accelerator does not;
evaluation batches are 512 sequences on a CPU, 4,096 elsewhere). `--json` writes the
figures.
"""

import json
import re

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from experiments import deviceless
from pka_jax import files
from pka_jax import sharding
from pka_jax.model import flops

config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'Config file.')
_NUM_ITEMS = flags.DEFINE_integer('num_items', 10_000_000, 'Catalog size.')
_DEVICES = flags.DEFINE_integer('devices', 8, 'Simulated CPU devices (all in the mesh).')
_TPU = flags.DEFINE_string('tpu', None, 'Compile for this Cloud TPU slice instead (libtpu '
                           "topology names: v5e:2x2, v5p:2x2x2, v6e:4x4, ...).")
_JSON = flags.DEFINE_string('json', None, 'Also write the figures to this JSON file.')
FLAGS = flags.FLAGS

_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 's32': 4, 'u32': 4, 'f16': 2, 'pred': 1, 's8': 1, 'u8': 1}


def per_device_bytes(shapes, shardings) -> int:
  """Bytes one device holds of arrays `shapes` placed by `shardings`."""
  return sum(int(np.prod(placement.shard_shape(shape.shape))) * shape.dtype.itemsize
             for shape, placement in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def largest_array(hlo_text: str) -> tuple[str, int]:
  """The largest array shape in an optimised HLO module, with its bytes."""
  best = ('', 0)
  for dtype, dims in re.findall(r'\b(f32|bf16|s32|u32|f16|pred|s8|u8)\[([\d,]+)\]', hlo_text):
    size = _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(',')]))
    if size > best[1]:
      best = (f'{dtype}[{dims}]', size)
  return best


def compiled_bytes(compiled) -> dict[str, int]:
  """XLA's plan for a compiled program, per device."""
  memory = compiled.memory_analysis()
  return {'arguments': memory.argument_size_in_bytes, 'outputs': memory.output_size_in_bytes,
          'temporaries': memory.temp_size_in_bytes, 'aliased': memory.alias_size_in_bytes}


def figures(config, num_items: int, devices: list, backend: str) -> dict:
  """Per-device bytes of the state and of XLA's plans for the compiled train and evaluation
  steps; the train step's model FLOPs."""
  plan = deviceless.abstract_train_step(config, num_items, devices, backend)
  compiled = plan.compile()
  state, placement = plan.state, plan.placement.state_shardings
  shape, size = largest_array(compiled.as_text())
  return {
      'backend': backend, 'device_kind': devices[0].device_kind, 'devices': len(devices),
      'hosts': len({device.process_index for device in devices}),
      'mesh': {'data': plan.placement.mesh.shape[sharding.DATA],
               'model': plan.placement.mesh.shape[sharding.MODEL]},
      'num_items': num_items, 'microbatches': plan.placement.train_microbatches,
      'per_device_bytes': {
          'parameters': per_device_bytes(state.params, placement.params),
          'item_table': per_device_bytes(state.params['item_emb'], placement.params['item_emb']),
          'optimizer': per_device_bytes(state.opt_state, placement.opt_state),
          **compiled_bytes(compiled), 'largest_array': size},
      'largest_array': shape,
      'model_flops': flops.train_step_flops(plan.placement.model.config, config.batch_size,
                                            config.loss),
      'eval': eval_figures(config, num_items, devices, backend)}


def eval_figures(config, num_items: int, devices: list, backend: str) -> dict:
  """XLA's plan for the evaluation step, per device, on a batch of full windows."""
  compiled, batch = deviceless.compile_eval_step(config, num_items, devices, backend)
  return {'batch_size': batch, 'per_device_bytes': compiled_bytes(compiled)}


def print_figures(f: dict, config) -> None:
  b = f['per_device_bytes']
  gib = lambda x: f'{x / 2**30:,.2f} GiB' if x >= 2**30 else f'{x / 2**20:,.1f} MiB'
  where = (f"{f['devices']} simulated devices" if f['backend'] == 'cpu' else
           f"{f['devices']} x {f['device_kind']} on {f['hosts']} host(s)")
  print(f"mesh        data {f['mesh']['data']} x model {f['mesh']['model']} ({where}); "
        f"{f['num_items']:,} items, d {config.hidden_units}, batch {config.batch_size} x "
        f"{config.maxlen}, {config.dtype}, ce_block_size {config.ce_block_size}, "
        f"{f['microbatches']} microbatch(es)")
  print(f"per device  parameters {gib(b['parameters'])} (item table {gib(b['item_table'])}), "
        f"optimiser state {gib(b['optimizer'])}")
  print(f"compiled    arguments {gib(b['arguments'])}, outputs {gib(b['outputs'])}, "
        f"temporaries {gib(b['temporaries'])} (aliased {gib(b['aliased'])})")
  print(f"largest     {f['largest_array']}: {gib(b['largest_array'])}")
  e = f['eval']['per_device_bytes']
  print(f"evaluation  batches of {f['eval']['batch_size']:,}: arguments {gib(e['arguments'])}, "
        f"temporaries {gib(e['temporaries'])}")
  print(f"FLOPs       {f['model_flops']:,} a step (model FLOPs, all devices)")


def main(argv):
  del argv
  config = FLAGS.config
  if _TPU.value:
    jax.config.update('jax_platforms', 'cpu')  # compiling only: never look for a TPU
    devices, backend = deviceless.tpu_devices(_TPU.value), 'tpu'
  else:
    jax.config.update('jax_num_cpu_devices', _DEVICES.value)
    devices, backend = jax.devices()[:_DEVICES.value], 'cpu'
  found = figures(config, _NUM_ITEMS.value, devices, backend)
  print_figures(found, config)
  if _JSON.value:
    files.write_text(_JSON.value, json.dumps(found, indent=2))


if __name__ == '__main__':
  app.run(main)
