"""The device mesh ('data', 'model'): batches split over 'data', the item table over 'model'.

The item table (and its optimiser state) is the one array that outgrows a device: at 10M
items and d 128 it holds 5 GB in float32, 20 GB with Adam's moments and its gradient. Its rows
are sharded over the `config.mesh_model` devices of the 'model' axis. The encoder is small:
its parameters are replicated, and a batch's rows go through it split over every device of
the mesh ('data' and 'model', wherever they divide: `row_axes`), so no 'model' shard repeats
another's work.
Whatever touches the table goes through shard_map: the input lookup here (which leaves each
device its share of rows), the loss (losses.sharded_cross_entropy) and the scores
(ranking.sharded_top_k), which take every row of their 'data' shard (jit gathers them over
'model') and combine the table's shards with collectives over 'model'.
With a single device (recommending, exporting) the same padded table is used unsharded.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA, MODEL = 'data', 'model'


def make_mesh(mesh_model: int, devices=None) -> Mesh:
  """`devices` (all by default) as a (data, model) grid, in process order: each process's
  devices are consecutive along 'model', so a process holds whole data shards whenever
  `mesh_model` divides its device count."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  if devices.size % mesh_model:
    raise ValueError(f'mesh_model {mesh_model} does not divide the {devices.size} devices')
  grid = devices.reshape(devices.size // mesh_model, mesh_model)
  return Mesh(grid, (DATA, MODEL), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def is_item_table(path) -> bool:
  return any(getattr(key, 'key', None) == 'item_emb' for key in path)


def state_shardings(state, mesh: Mesh):
  """NamedShardings for a train state (or params): item-table leaves split by rows over
  'model' (the Adam moments too), everything else replicated."""

  def spec(path, leaf):
    if is_item_table(path) and getattr(leaf, 'ndim', 0) == 2:
      return NamedSharding(mesh, P(MODEL, None))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(spec, state)


def data_shards(mesh: Mesh | None) -> int:
  """How many ways `mesh` splits a batch's rows (1 without a mesh)."""
  return mesh.shape[DATA] if mesh is not None else 1


def row_axes(mesh: Mesh | None, rows: int) -> str | tuple[str, str]:
  """The mesh axes the encoder splits a batch of `rows` rows over: 'data' and 'model' where
  the table is split and the rows divide over every device (the encoder's parameters are
  replicated, so 'model' shards holding the same rows would repeat each other's work);
  'data' alone otherwise."""
  if mesh is not None and mesh.shape[MODEL] > 1 and rows % mesh.size == 0:
    return (DATA, MODEL)
  return DATA


def row_shards(mesh: Mesh | None, rows: int) -> int:
  """How many ways the encoder splits a batch of `rows` rows (`row_axes`; 1 without a mesh)."""
  if mesh is None:
    return 1
  axes = row_axes(mesh, rows)
  return mesh.size if axes == (DATA, MODEL) else mesh.shape[DATA]


def split_rows(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  """`x` (rows first) laid out as the encoder splits its rows (`row_axes`)."""
  if mesh is None or mesh.shape[MODEL] == 1:
    return x
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, P(row_axes(mesh, x.shape[0]))))


def shard_range(rows_per_shard: int) -> jax.Array:
  """Global row of this 'model' shard's first row (inside shard_map)."""
  return jax.lax.axis_index(MODEL) * rows_per_shard


def lookup(table_RxD: jax.Array, ids_BxT: jax.Array, mesh: Mesh) -> jax.Array:
  """`table[ids]` with the table's rows sharded over `mesh`'s 'model' axis: each shard
  gathers the rows it holds, zeros elsewhere, and a sum over 'model' joins them, each device
  keeping its share of the rows (`row_axes`); only `B·T × D` activations cross devices,
  never the table."""
  axes = row_axes(mesh, ids_BxT.shape[0])

  def local(table_rxD, ids):
    rows = table_rxD.shape[0]
    row = ids - shard_range(rows)
    held = (row >= 0) & (row < rows)
    x = jnp.where(held[..., None], table_rxD[jnp.clip(row, 0, rows - 1)], 0.0)
    if axes == DATA:
      return jax.lax.psum(x, MODEL)
    return jax.lax.psum_scatter(x, MODEL, scatter_dimension=0, tiled=True)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(MODEL), P(DATA)), out_specs=P(axes))(
      table_RxD, ids_BxT)


def host_slice(mesh: Mesh) -> tuple[int, int]:
  """(index, count) of this process's share of each batch's rows: processes whose devices
  sit on the same 'data' rows of the mesh read the same share."""
  rows = sorted({int(np.argwhere(mesh.devices == d)[0][0]) for d in mesh.local_devices})
  per_host = len(rows)
  if rows != list(range(rows[0], rows[0] + per_host)) or rows[0] % per_host:
    raise ValueError(f'process {jax.process_index()} holds mesh rows {rows}: expected a '
                     'contiguous, aligned block')
  return rows[0] // per_host, mesh.devices.shape[0] // per_host


def split_cpu(devices: int) -> None:
  """Makes the CPU backend `devices` XLA devices, data-parallel over the 'data' axis (choose
  with `config_check.cpu_devices_for`). Call it before any JAX operation.

  Measured on 2 cores (experiments/speed/benchmark.py), 2 devices ran the validation pass
  1.15-1.5x faster (ML-1M PKA, ML-100K SASRec), but the train step 1.15x (PKA) and 1.3x
  (SASRec d 256) slower: its microbatches, grouped over both devices' rows, cut fewer
  columns, and the devices' large products contend for the cores. A program on one device
  of the split still runs on every core, so `pka_jax.main` splits by default and trains on
  one device (`devices_to_train`)."""
  jax.config.update('jax_num_cpu_devices', devices)


def cpu_devices_requested() -> int | None:
  """The CPU devices the environment already asks for (`JAX_NUM_CPU_DEVICES`, or XLA's
  `--xla_force_host_platform_device_count` in `XLA_FLAGS`), or None: a split the user made,
  which `split_cpu` must not replace."""
  if jax.config.jax_num_cpu_devices > 0:
    return jax.config.jax_num_cpu_devices
  match = re.search(r'--xla_force_host_platform_device_count=(\d+)',
                    os.environ.get('XLA_FLAGS', ''))
  return int(match.group(1)) if match else None


def devices_to_train(cpu_devices: int | None) -> int | None:
  """How many devices a job trains on (None: all) where `cpu_devices` is the split a user
  asked for, by a flag or the environment (None: the default one, see `split_cpu`): one on a
  CPU split by default, where a single device trains fastest; all on accelerators, several
  hosts or a split asked for."""
  if cpu_devices is None and jax.default_backend() == 'cpu' and jax.process_count() == 1:
    return 1
  return None


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins a multi-process run: every process calls it before touching a device. With no
  arguments JAX finds its peers on Cloud TPU, SLURM and GKE; elsewhere all three are needed."""
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def describe_process() -> str:
  """One line on this process's view of the run (every host logs its own)."""
  local = jax.local_devices()
  return (f'process {jax.process_index()} of {jax.process_count()}: {len(local)} local '
          f'{local[0].platform} device(s) {[d.id for d in local]} of {jax.device_count()}')
