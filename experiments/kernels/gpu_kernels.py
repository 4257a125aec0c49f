"""The kernels a config's train step launches on an NVIDIA GPU, found without a GPU.

  pip install jax-cuda12-plugin==$JAX jax-cuda12-pjrt==$JAX  # JAX: the installed jax version
  pip install nvidia-cuda-nvcc-cu12  # optional: ptxas, for the Pallas kernels' registers
  python -m experiments.kernels.gpu_kernels --config=configs/ml1m.py --config.dtype=bfloat16
  python -m experiments.kernels.gpu_kernels --config=configs/ml1m.py --config.dtype=bfloat16 \
      --config.attention_impl=pallas --config.ce_impl=pallas --gpu=h200 --json=/tmp/k.json

XLA compiles for a GPU it is only described (deviceless compilation: jax's CUDA plugin and a
`GpuTargetConfigProto`), so any machine, a laptop's CPU included, sees the program an H100
or H200 would run: the same fusions, hence the same kernels, and the Pallas kernels compiled
by Triton for that GPU. On a GPU a small model's step is bound by its kernels' count and
chains rather than by FLOPs (an H200 trace of ML-1M's bfloat16 step: 445 kernels, 248 of
them under 3 us; its longest chain of kernels, each waiting on the one before, took 1.56 ms
of the 2.4 ms step), so this counts them (experiments/hlo_kernels.py): all of them, by part
of the model and pass (hlo_kernels.part_of), and the longest chain, which no concurrency in a
CUDA graph shortens; also the bytes each kernel moves, by part, and the time they take at the
GPU's bandwidth (`--chain` lists the chain kernel by kernel). With ptxas it also assembles the
Pallas kernels for `sm_90a` and reports their registers and spills.

Two differences from a real device: without one XLA does not autotune, so every matrix
product is a Triton GEMM here where cuBLAS may win on the device (one kernel either way, bar
cuBLAS's split-K reductions); and cuDNN is not compiled (the train step's attention with
dropout never uses it). The config's backend-dependent choices (microbatches, loss chunks,
attention kernels, the config check) are made for a GPU. The catalog is `--num_items` items;
no data is read.
"""

import collections
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from experiments import deviceless
from experiments import hlo_kernels
from pka_jax import files

# Public figures of each GPU (NVIDIA's data sheets; CUDA's device queries for the per-SM
# limits, which Hopper shares): what XLA's fusion and tiling heuristics read.
GPUS = {
    'h100': {'name': 'NVIDIA H100 80GB HBM3', 'memory_bytes': 80 * 2**30,
             'bandwidth': 3.35e12, 'clock_ghz': 1.98},
    'h200': {'name': 'NVIDIA H200', 'memory_bytes': 141 * 10**9,
             'bandwidth': 4.8e12, 'clock_ghz': 1.98},
}
_HOPPER = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  memory_bandwidth: {bandwidth:.0f}
  l2_cache_size: 52428800
  clock_rate_ghz: {clock_ghz}
  device_memory_size: {memory_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{
    major: 9
    minor: 0
  }}
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
}}
device_description_str: "{name}"
"""


def target_config(gpu: str) -> str:
  """The `GpuTargetConfigProto` text XLA compiles for, as a CUDA device would report it."""
  return _HOPPER.format(**GPUS[gpu])


def gpu_devices(gpu: str) -> list:
  """A one-GPU topology's devices, for compiling only; jax's CUDA plugin must be installed."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topology = topologies.get_topology_desc(gpu, 'cuda', target_config=target_config(gpu),
                                            topology='1x1x1')
  except (NotImplementedError, RuntimeError) as error:
    version = jax.__version__
    raise SystemExit(f'compiling for a GPU needs jax\'s CUDA plugin ({error}): pip install '
                     f'jax-cuda12-plugin=={version} jax-cuda12-pjrt=={version}') from None
  return list(topology.devices)


def find_ptxas() -> str | None:
  """CUDA's PTX assembler: on the PATH, or from the nvidia-cuda-nvcc-cu12 wheel."""
  if found := shutil.which('ptxas'):
    return found
  try:
    spec = importlib.util.find_spec('nvidia.cuda_nvcc')
  except ModuleNotFoundError:
    return None
  for directory in (spec.submodule_search_locations or []) if spec else []:
    if os.access(path := os.path.join(directory, 'bin', 'ptxas'), os.X_OK):
      return path
  return None


def registers(ptx_dir: str, names: set[str], ptxas: str, arch: str = 'sm_90a') -> dict:
  """For each named kernel in the PTX files XLA dumped: the registers a thread uses and
  the bytes it spills to local memory, as ptxas assembles it for `arch`."""
  found = {}
  for path in sorted(glob.glob(os.path.join(ptx_dir, '*.ptx'))):
    with open(path) as f:
      entries = set(re.findall(r'\.entry (\w+)\(', f.read())) & names
    if not entries:
      continue
    out = subprocess.run([ptxas, '-v', f'--gpu-name={arch}', path, '-o', os.devnull],
                         capture_output=True, text=True, check=True).stderr
    for entry in entries:
      info = out[out.index(f"Compiling entry function '{entry}'"):]
      found[entry] = {'registers': int(re.search(r'Used (\d+) registers', info).group(1)),
                      'spill_store_bytes': int(re.search(r'(\d+) bytes spill stores',
                                                         info).group(1)),
                      'spill_load_bytes': int(re.search(r'(\d+) bytes spill loads',
                                                        info).group(1))}
  return found


def part(kernel: hlo_kernels.Kernel) -> str:
  where, direction = hlo_kernels.part_of(kernel.op_name)
  return f'{where} ({direction})' if direction else where


def report(result: hlo_kernels.Census, gpu: str, config) -> dict:
  return {'gpu': GPUS[gpu]['name'], 'jax': jax.__version__,
          'config': {'model': config.model, 'dtype': config.dtype,
                     'batch_size': config.batch_size, 'maxlen': config.maxlen,
                     'attention_impl': config.attention_impl,
                     'ce_impl': config.get('ce_impl', 'xla'),
                     'layer_norm_impl': config.get('layer_norm_impl', 'xla'),
                     'ffn_impl': config.get('ffn_impl', 'xla')},
          'kernels': result.launches, 'longest_chain': len(result.longest_chain),
          'bytes': result.bytes, 'memory_seconds': result.bytes / GPUS[gpu]['bandwidth'],
          'bytes_by_part': dict(result.by(part, lambda k: k.bytes * k.launches).most_common()),
          'longest_chain_by_part': dict(collections.Counter(
              part(k) for k in result.longest_chain).most_common()),
          'longest_chain_in_order': [f'{k.kind} {k.name}: {part(k)}'
                                     for k in result.longest_chain],
          'by_kind': dict(result.by(lambda k: k.kind).most_common()),
          'by_part': dict(result.by(part).most_common()),
          'triton': [k.name for k in result.kernels if k.kind == 'triton']}


def print_report(figures: dict) -> None:
  config = figures['config']
  print(f"{figures['gpu']} (compiled without one, jax {figures['jax']}): {config['model']} "
        f"{config['dtype']}, batch {config['batch_size']} x {config['maxlen']}, attention "
        f"{config['attention_impl']}, loss {config['ce_impl']}, LayerNorm "
        f"{config['layer_norm_impl']}, feed-forward {config['ffn_impl']}")
  print(f"train step: {figures['kernels']} kernels; longest chain {figures['longest_chain']}; "
        f"about {figures['bytes'] / 1e9:.2f} GB through memory, "
        f"{figures['memory_seconds'] * 1e3:.2f} ms at the GPU's bandwidth")
  print('by kind:   ' + ', '.join(f'{k} {n}' for k, n in figures['by_kind'].items()))
  print('by part of the model (pass): kernels, MB moved')
  for where, count in figures['by_part'].items():
    print(f"  {count:5d}  {figures['bytes_by_part'][where] / 1e6:8.1f}  {where}")
  for name, usage in figures.get('registers', {}).items():
    print(f"{name}: {usage['registers']} registers a thread, spills "
          f"{usage['spill_store_bytes']} bytes stored, {usage['spill_load_bytes']} loaded")
  print('the longest chain, by part:')
  for where, count in figures['longest_chain_by_part'].items():
    print(f'  {count:5d}  {where}')
  if _CHAIN.value:
    print('the longest chain, in order:')
    for i, kernel in enumerate(figures['longest_chain_in_order']):
      print(f'  {i + 1:5d}  {kernel}')


def main(argv):
  del argv
  jax.config.update('jax_platforms', 'cpu')  # compiling only: never initialise a GPU
  config = FLAGS.config
  ptxas = find_ptxas()
  with tempfile.TemporaryDirectory() as dump:
    if ptxas:  # before XLA reads its flags: the PTX of every kernel it compiles
      os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}"
    compiled = deviceless.compile_train_step(config, _NUM_ITEMS.value,
                                              gpu_devices(_GPU.value), 'gpu')
    result = hlo_kernels.census(compiled.as_text())
    figures = report(result, _GPU.value, config)
    if ptxas:
      figures['registers'] = registers(dump, set(figures['triton']), ptxas)
  print_report(figures)
  if _JSON.value:
    files.write_text(_JSON.value, json.dumps(figures, indent=2))


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/ml1m.py', 'Config file.')
_GPU = flags.DEFINE_enum('gpu', 'h100', sorted(GPUS), 'The GPU to compile for.')
_NUM_ITEMS = flags.DEFINE_integer('num_items', 3416, "Catalog size (ML-1M's by default).")
_JSON = flags.DEFINE_string('json', None, 'Also write the figures to this JSON file.')
_CHAIN = flags.DEFINE_bool('chain', False, 'Also print the longest chain kernel by kernel.')

if __name__ == '__main__':
  app.run(main)
