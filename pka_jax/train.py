"""Training: the train state, the jitted step, the epoch loop, early stopping and checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

from absl import logging
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import tqdm

from pka_jax import checkpoint
from pka_jax import config_check
from pka_jax import data
from pka_jax import evaluate
from pka_jax import faults
from pka_jax import losses
from pka_jax import metric_writer
from pka_jax import pallas_loss
from pka_jax import recommend
from pka_jax import sharding
from pka_jax.data.pipeline import TrainInput
from pka_jax.data.sequences import SplitDataset, window_width
from pka_jax.models import Encoder, ModelConfig, create_model


def create_train_state(model: Encoder, config: ml_collections.ConfigDict,
                       rng: jax.Array) -> train_state.TrainState:
  rows = sharding.data_shards(model.mesh)  # one per shard
  params = model.init(rng, jnp.zeros((rows, config.maxlen), jnp.int32))['params']
  # A step whose gradient is not finite leaves parameters and moments as they were; the loop
  # then stops the run (the run never goes on past one).
  tx = apply_if_all_finite(
      optax.adam(config.learning_rate, b1=config.adam_b1, b2=config.adam_b2),
      max_consecutive_errors=2**31 - 1)
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def all_finite(tree) -> jax.Array:
  """Whether every element of `tree` is finite: one reduction over the leaves laid end to
  end, and one per item-table leaf (a model-parallel mesh splits those by rows; laid end to
  end with the others they would be gathered)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  split = [leaf for path, leaf in leaves if sharding.is_item_table(path)]
  whole = [jnp.ravel(leaf) for path, leaf in leaves if not sharding.is_item_table(path)]
  checks = [jnp.isfinite(leaf).all() for leaf in split]
  if whole:
    checks.append(jnp.isfinite(jnp.concatenate(whole)).all())
  return functools.reduce(jnp.logical_and, checks, jnp.array(True))


def apply_if_all_finite(inner: optax.GradientTransformation, max_consecutive_errors: int
                        ) -> optax.GradientTransformation:
  """`optax.apply_if_finite`, state and all (checkpoints are the same), with its finiteness
  test done once over every gradient (`all_finite`): optax reduces each leaf on its own,
  which on a GPU is a kernel a leaf, 70 of the 382 kernels of ML-1M's PKA step
  (experiments/gpu_kernels.py)."""
  wrapped = optax.apply_if_finite(inner, max_consecutive_errors)

  def update(updates, state, params=None):
    isfinite = all_finite(updates)
    notfinite_count = jnp.where(isfinite, jnp.zeros([], jnp.int32),
                                optax.safe_int32_increment(state.notfinite_count))
    updates, inner_state = jax.lax.cond(
        isfinite | (notfinite_count > max_consecutive_errors),
        lambda: inner.update(updates, state.inner_state, params),
        lambda: (jax.tree.map(jnp.zeros_like, updates), state.inner_state))
    total_notfinite = jnp.where(isfinite, state.total_notfinite,
                                optax.safe_int32_increment(state.total_notfinite))
    return updates, optax.ApplyIfFiniteState(notfinite_count, isfinite, total_notfinite,
                                             inner_state)

  return optax.GradientTransformation(wrapped.init, update)


def loss_sums(params, apply_fn, batch: dict[str, jax.Array], rng: jax.Array,
              loss_name: str, ce_block_size: int = 0, ce_chunk_rows: int = 0,
              ce_impl: str = 'xla', mesh: jax.sharding.Mesh | None = None,
              num_items: int | None = None) -> tuple[jax.Array, jax.Array]:
  """`(sum, count)` of the loss over the real targets of `batch` (rows sharded over `mesh`'s
  'data' axis and the item table over its 'model' axis, if given). A microbatch says which
  rows of the step's batch it holds in `batch['rows']`: its dropout masks are theirs."""
  dropout_rng, negatives_rng = jax.random.split(rng)
  rows_B = batch.get('rows')
  if rows_B is not None:  # every microbatch its own negatives
    negatives_rng = jax.random.fold_in(negatives_rng, rows_B[0])
  hidden_BxTxD = apply_fn({'params': params}, batch['inputs'], rows_B=rows_B,
                          rngs={'dropout': dropout_rng})
  item_emb_VxD = params['item_emb']['embedding']
  if loss_name == 'ce' and mesh is not None and mesh.shape[sharding.MODEL] > 1:
    return _sharded_loss_sums(hidden_BxTxD, item_emb_VxD, batch['targets'], mesh=mesh,
                              num_items=num_items, block_size=ce_block_size)
  if loss_name == 'ce':
    if ce_impl == 'pallas':
      local = pallas_loss.pallas_cross_entropy
    elif ce_block_size:
      local = functools.partial(losses.blockwise_cross_entropy, block_size=ce_block_size)
    else:
      local = functools.partial(losses.chunked_cross_entropy, chunk_rows=ce_chunk_rows)
    if mesh is None or mesh.size == 1:
      return local(hidden_BxTxD, item_emb_VxD, batch['targets'])
    def per_device(hidden, item_emb, targets):
      # Each device sorts and chunks its own rows. The table, cast to per-device values, gets
      # a per-device gradient that the cast's transpose sums over devices, once.
      item_emb = jax.lax.pcast(item_emb, sharding.DATA, to='varying')
      return jax.tree.map(lambda x: jax.lax.psum(x, sharding.DATA),
                          local(hidden, item_emb, targets))

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(sharding.DATA), P(),
                                                             P(sharding.DATA)), out_specs=P())
    return sharded(hidden_BxTxD, item_emb_VxD, batch['targets'])
  if loss_name == 'bce':
    return losses.sampled_bce(hidden_BxTxD, item_emb_VxD, batch['targets'], negatives_rng)
  raise ValueError(f'Unknown loss {loss_name!r}: expected ce or bce')


def loss_options(config: ml_collections.ConfigDict, num_items: int) -> dict[str, Any]:
  """`train_step`'s loss arguments from `config`."""
  return {'loss_name': config.loss, 'ce_block_size': config.ce_block_size,
          'ce_chunk_rows': config.ce_chunk_rows, 'ce_impl': config.get('ce_impl', 'xla'),
          'num_items': num_items}


def _sharded_loss_sums(hidden_BxTxD, table_VxD, targets_BxT, *, mesh, num_items, block_size):
  """The cross-entropy with the table's rows split over 'model' (losses.sharded_cross_entropy)."""
  rows_per_shard = table_VxD.shape[0] // mesh.shape[sharding.MODEL]
  positions = targets_BxT.size // mesh.shape[sharding.DATA]
  block = block_size or losses.chunk_rows_for(positions, rows_per_shard)

  def per_device(hidden, table, targets):
    table = jax.lax.pcast(table, sharding.DATA, to='varying')  # its gradient: summed over data
    total, count = losses.sharded_cross_entropy(hidden, table, targets, num_items=num_items,
                                                block_size=block)
    return jax.lax.psum(total, sharding.DATA), jax.lax.psum(count, sharding.DATA)

  return jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(sharding.DATA), P(sharding.MODEL), P(sharding.DATA)),
      out_specs=P())(hidden_BxTxD, table_VxD, targets_BxT)


def _sums_and_grads(params, apply_fn, batch: dict[str, jax.Array], rng: jax.Array, **loss):
  """`(grads, total, count)`: the gradient of the loss sum over `batch`, and the sums."""
  def loss_sum(params):
    return loss_sums(params, apply_fn, batch, rng, **loss)
  (total, count), grads = jax.value_and_grad(loss_sum, has_aux=True)(params)
  return grads, total, count


def _apply_summed_gradients(state: train_state.TrainState, grads, total, count
                            ) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One Adam step on the mean loss, from the gradient of the loss sum and the target count."""
  grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
  state = state.apply_gradients(grads=grads)
  finite = jnp.isfinite(total) & state.opt_state.last_finite
  return state, {'loss_sum': total, 'loss_count': count, 'finite': finite}


def train_step(state: train_state.TrainState, batch: dict[str, jax.Array], rng: jax.Array,
               *, loss_name: str, ce_block_size: int = 0, ce_chunk_rows: int = 0,
               ce_impl: str = 'xla', microbatches: int = 1, mesh: jax.sharding.Mesh | None = None,
               num_items: int | None = None,
               ) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One Adam step on the mean loss over the batch; metrics leave as sums and counts.

  With `microbatches > 1` the batch's gradient is accumulated over that many slices of it
  (each device's rows split evenly): the same gradient, dropout masks included, with
  activations small enough to stay in a CPU's cache. `microbatches=0` picks
  `microbatches_for` the batch's shape (its windows may be trimmed).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  loss = {'loss_name': loss_name, 'ce_block_size': ce_block_size,
          'ce_chunk_rows': ce_chunk_rows, 'ce_impl': ce_impl, 'mesh': mesh,
          'num_items': num_items}
  if not microbatches:
    rows, width = batch['inputs'].shape
    data_shards = sharding.data_shards(mesh)
    microbatches = microbatches_for(rows // data_shards, width)

  if microbatches == 1:
    sums = _sums_and_grads(state.params, state.apply_fn, batch, step_rng, **loss)
  else:
    rows_per_microbatch = batch['inputs'].shape[0] // microbatches

    def accumulate(carry, micro):
      micro_batch, index = micro
      rows_B = jnp.arange(rows_per_microbatch) * microbatches + index  # split_microbatches'
      sums = _sums_and_grads(state.params, state.apply_fn, {**micro_batch, 'rows': rows_B},
                             step_rng, **loss)
      return jax.tree.map(jnp.add, carry, sums), None

    zeros = _zero_sums(state.params)
    micro = (jax.tree.map(lambda x: split_microbatches(x, microbatches), batch),
             jnp.arange(microbatches))
    sums, _ = jax.lax.scan(accumulate, zeros, micro)
  return _apply_summed_gradients(state, *sums)


def length_sorted_step(state: train_state.TrainState, microbatches: dict[int, dict],
                       rng: jax.Array, *, mesh: jax.sharding.Mesh | None = None, **loss
                       ) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """`train_step` on a batch given as length-sorted microbatches (`microbatch_stacks`): for
  each window width, `count` microbatches of `rows` rows each (of a fixed-size stack, so one
  program takes every batch). Each microbatch's `rows` name its rows in the batch, whose
  dropout masks it draws: the same step as the whole batch's, for the FLOPs of its widths.

  Over several 'data' devices (and an unsplit item table), each device sums the gradients of
  its rows of every microbatch on its own and the devices meet once, in a sum at the end:
  no device waits for another between microbatches.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  if mesh is None or mesh.shape[sharding.DATA] == 1 or mesh.shape[sharding.MODEL] > 1:
    sums = _sorted_sums(state.params, state.apply_fn, microbatches, step_rng,
                        _zero_sums(state.params), mesh=mesh, **loss)
    return _apply_summed_gradients(state, *sums)

  def per_device(params, microbatches, step_rng):
    # Varying copies: their gradients stay per device until the one psum below.
    params, start = jax.lax.pcast((params, _zero_sums(params)), sharding.DATA, to='varying')
    sums = _sorted_sums(params, state.apply_fn, microbatches, step_rng, start, mesh=None,
                        **loss)
    return jax.tree.map(lambda x: jax.lax.psum(x, sharding.DATA), sums)

  stacks_spec = jax.tree.map(lambda x: P(None, sharding.DATA) if x.ndim else P(), microbatches)
  sums = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), stacks_spec, P()),
                       out_specs=P())(state.params, microbatches, step_rng)
  return _apply_summed_gradients(state, *sums)


def _zero_sums(params) -> tuple[Any, jax.Array, jax.Array]:
  return jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(())


def _sorted_sums(params, apply_fn, microbatches: dict[int, dict], step_rng: jax.Array,
                 sums: tuple[Any, jax.Array, jax.Array], **loss
                 ) -> tuple[Any, jax.Array, jax.Array]:
  """`sums` plus `(grads, total, count)` of every microbatch of `length_sorted_step`."""
  for stack in microbatches.values():
    def add_microbatch(index, sums, stack=stack):
      micro = {name: stack[name][index] for name in ('inputs', 'targets', 'rows')}
      new = _sums_and_grads(params, apply_fn, micro, step_rng, **loss)
      return jax.tree.map(jnp.add, sums, new)
    sums = jax.lax.fori_loop(0, stack['count'], add_microbatch, sums)
  return sums


def rank_on_mesh(params, inputs_BxT, seen_rows_P, seen_items_P, targets_B, *, config,
                 mesh: jax.sharding.Mesh, model: Encoder, num_items: int):
  """Top-k lists and target ranks of an evaluation batch (`Run.rank_fn`): `model` (the
  deterministic encoder) over microbatches of each device's rows, then the scores of each
  'model' shard's items, blockwise (evaluate.sharded_top_k)."""
  data_shards = mesh.shape[sharding.DATA]
  rows_per_device = config.eval_batch_size // data_shards
  encode = functools.partial(model.apply, {'params': params}, method=Encoder.encode_last)
  hidden_BxD = map_microbatches(
      encode, microbatches_for(rows_per_device, inputs_BxT.shape[1]), inputs_BxT)
  table_VxD = params['item_emb']['embedding']
  rows_per_shard = table_VxD.shape[0] // mesh.shape[sharding.MODEL]
  top_k = functools.partial(
      evaluate.sharded_top_k, num_items=num_items, top_k=config.top_k,
      block_size=losses.chunk_rows_for(rows_per_device, rows_per_shard))
  data, model_rows = P(sharding.DATA), P(sharding.MODEL)
  return jax.shard_map(top_k, mesh=mesh, in_specs=(data, model_rows, data, data, data),
                       out_specs=(data, data))(
                           hidden_BxD, table_VxD, seen_rows_P, seen_items_P, targets_B)


def microbatch_rows(width: int, *, positions: int, data_shards: int) -> int:
  """Rows of a length-sorted microbatch `width` wide: `positions` per data shard."""
  return max(1, positions // width) * data_shards


def length_sorted_microbatches(inputs_BxT: np.ndarray, *, data_shards: int, positions: int,
                               maxlen: int, padding_column: bool = False
                               ) -> list[tuple[np.ndarray, int]]:
  """A batch's rows in microbatches of similar history length, as `(rows, width)`, longest
  first: each takes the longest rows left, as many as fill `positions` positions per data
  shard at the `window_width` of the longest of them (so a few shapes recur), one column
  wider with `padding_column`. The last, of the shortest rows, is filled up with -1 (no
  row)."""
  lengths_B = np.count_nonzero(inputs_BxT, axis=1)
  order = np.argsort(-lengths_B, kind='stable')
  microbatches, start = [], 0
  while start < len(order):
    width = window_width(int(lengths_B[order[start]]) + int(padding_column), maxlen)
    size = microbatch_rows(width, positions=positions, data_shards=data_shards)
    rows_R = order[start:start + size]
    microbatches.append((np.pad(rows_R, (0, size - len(rows_R)), constant_values=-1), width))
    start += size
  return microbatches


def microbatch_stacks(local_batch: dict[str, np.ndarray],
                      microbatches: list[tuple[np.ndarray, int]], *, rows_at: dict[int, int],
                      capacity: dict[int, int]) -> dict[int, dict[str, np.ndarray]]:
  """`length_sorted_microbatches` stacked by width: `capacity[w]` slots of `rows_at[w]` rows
  (the first `count` filled, rows -1 and the rest empty), the same shapes for every batch."""
  stacks = {}
  for width, size in rows_at.items():
    stack = {name: np.zeros((capacity[width], size, width), np.int32)
             for name in ('inputs', 'targets')}
    stack['rows'] = np.zeros((capacity[width], size), np.int32)
    chosen = [rows_R for rows_R, w in microbatches if w == width]
    for slot, rows_R in enumerate(chosen):
      real_Rx1 = (rows_R >= 0)[:, None]
      for name in ('inputs', 'targets'):
        stack[name][slot] = np.where(real_Rx1, local_batch[name][rows_R, -width:], 0)
      stack['rows'][slot] = np.maximum(rows_R, 0)  # -1: an empty row, its masks unused
    stack['count'] = np.int32(len(chosen))
    stacks[width] = stack
  return stacks


# Positions per microbatch on CPU: a block's activations then stay in cache. Measured at the
# ML-1M PKA shape on 2 cores, 1,024 to 4,096 positions all ran the step ~30% faster than the
# whole batch of 32,768 at once (experiments/benchmark.py).
CPU_MICROBATCH_POSITIONS = 2048
# Host memory for the validation batches, which are the same every epoch: built once and kept
# up to this size (33 MiB at ML-1M's synthetic shapes); past it, built again for every pass.
VALIDATION_BATCH_BYTES = 1 << 30


def microbatches_for(rows_per_device: int, maxlen: int, backend: str | None = None) -> int:
  """How many microbatches a device's rows are split into: about CPU_MICROBATCH_POSITIONS
  positions each on CPU (a divisor of the rows), none on accelerators."""
  if (backend or jax.default_backend()) != 'cpu':
    return 1
  target = max(1, rows_per_device * maxlen // CPU_MICROBATCH_POSITIONS)
  return max(n for n in range(1, min(target, rows_per_device) + 1) if rows_per_device % n == 0)


def split_microbatches(x_BxF: jax.Array, count: int) -> jax.Array:
  """`B×…` to `count × B/count × …`; microbatch `i` holds rows `i, i + count, …`, so each
  device's contiguous shard of rows contributes equally to every microbatch."""
  return jnp.swapaxes(x_BxF.reshape(x_BxF.shape[0] // count, count, *x_BxF.shape[1:]), 0, 1)


def merge_microbatches(x_CxRxF: jax.Array) -> jax.Array:
  """The inverse of `split_microbatches`."""
  return jnp.swapaxes(x_CxRxF, 0, 1).reshape(-1, *x_CxRxF.shape[2:])


def map_microbatches(fn, count: int, *arrays_BxF: jax.Array):
  """`fn(*arrays)` computed `count` microbatches at a time (`fn` must be row-wise)."""
  if count == 1:
    return fn(*arrays_BxF)
  outputs = jax.lax.map(lambda micro: fn(*micro),
                        tuple(split_microbatches(a, count) for a in arrays_BxF))
  return jax.tree.map(merge_microbatches, outputs)


@dataclasses.dataclass
class Progress:
  """What a checkpoint records about the run besides the parameters (saved as JSON)."""

  epoch: int = 0  # completed epochs
  data_iterator: dict | None = None  # grain state inside the current epoch, None at its start
  best_ndcg: float = -1.0
  best_step: int = -1
  bad_validations: int = 0
  history: list = dataclasses.field(default_factory=list)  # validation metrics per epoch

  def best_validation(self) -> dict[str, float]:
    """The validation metrics recorded at `best_step` (without the 'valid/' prefix)."""
    record = next(r for r in self.history if r['step'] == self.best_step)
    return {k.removeprefix('valid/'): v for k, v in record.items() if k.startswith('valid/')}


def load_dataset_once(config: ml_collections.ConfigDict) -> SplitDataset:
  """Process 0 prepares the dataset while the others wait, then they all load it."""
  if jax.process_count() == 1:
    return data.load_dataset(config)
  if jax.process_index() == 0:
    dataset = data.load_dataset(config)
  multihost_utils.sync_global_devices('pka_jax: dataset prepared')
  if jax.process_index() != 0:
    dataset = data.load_dataset(config)
  return dataset


# Fields that define the parameters, the data or the course of training a checkpoint belongs
# to. Left out: limits a resumed run may change (max_epochs, patience), and settings that
# compute the same function (attention_impl, layer_norm_impl, ffn_impl, microbatches, loss
# chunking, eval batch size).
RUN_DEFINING_FIELDS = tuple(sorted(
    {f.name for f in dataclasses.fields(ModelConfig)}
    - {'num_items', 'deterministic', 'attention_impl', 'layer_norm_impl', 'ffn_impl'}
    | {'dataset', 'q_valid', 'q_test', 'max_eval', 'synthetic', 'seed', 'batch_size',
       'prng_impl', 'loss', 'learning_rate', 'adam_b1', 'adam_b2'}))


class WorkdirMismatchError(ValueError):
  """The workdir's checkpoints belong to a run of another configuration."""


class WorkdirError(OSError):
  """The workdir cannot be written."""


def check_writable(workdir: str) -> None:
  """Raises WorkdirError naming `workdir` unless the run can create files there."""
  if re.match(r'[a-z][a-z0-9+.-]*://', workdir):
    raise WorkdirError(f'the workdir {workdir} is a URL: runs read and write it as a '
                       'directory; mount the bucket (gcsfuse) and give the mounted path')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as error:
    raise WorkdirError(f'cannot write to the workdir {workdir}: '
                       f'{error.strerror or error}') from None


def check_same_run(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict,
                   workdir: str) -> None:
  """Refuses to resume or evaluate a workdir whose checkpoints come from another model."""
  differences = [f'{name}: {saved.get(name)!r} there, {config.get(name)!r} here'
                 for name in RUN_DEFINING_FIELDS
                 if _plain(saved.get(name)) != _plain(config.get(name))]
  if differences:
    raise WorkdirMismatchError(f'{workdir} holds a run of another configuration ('
                               + '; '.join(differences) + '): use another --workdir')


def _plain(value):
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


class Run:
  """One training run in a workdir: data, model, mesh, compiled functions and checkpoints."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               train_devices: int | None = None):
    """Fills in `config.eval_batch_size` where it is 0 (the backend's choice).

    Evaluation takes every device; training the first `train_devices` of them (on one
    process; all by default): a CPU split into one device per core evaluates faster on all,
    but trains faster on one (sharding.devices_to_train)."""
    devices, processes = jax.device_count(), jax.process_count()
    config_check.settle(config, devices=devices, processes=processes)
    check_writable(workdir)
    self.config, self.workdir = config, workdir
    self.dataset: SplitDataset = load_dataset_once(config)
    self.eval_mesh = sharding.make_mesh(config.mesh_model)
    self.mesh = self.eval_mesh  # training's
    if train_devices is not None and train_devices < devices:
      if processes > 1:
        raise ValueError('train_devices: training on some devices only needs one process')
      self.mesh = sharding.make_mesh(config.mesh_model, jax.devices()[:train_devices])
      logging.info('Training on %d of the %d devices, evaluating on all.', train_devices,
                   devices)
    logging.info('Training mesh: data %d x model %d (the item table split over %d devices).',
                 self.mesh.shape[sharding.DATA], self.mesh.shape[sharding.MODEL],
                 self.mesh.shape[sharding.MODEL])
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(sharding.DATA))
    self.eval_batch_sharding = NamedSharding(self.eval_mesh, P(sharding.DATA))
    num_items = self.dataset.num_items
    self.model = create_model(config, num_items, deterministic=False, mesh=self.mesh)
    self.eval_model = create_model(config, num_items, deterministic=True, mesh=self.eval_mesh)
    init_rng, self.dropout_rng = jax.random.split(
        jax.random.key(config.seed, impl=config.prng_impl))
    init = functools.partial(create_train_state, self.model, config)
    abstract_state = jax.eval_shape(init, init_rng)
    self.state_shardings = sharding.state_shardings(abstract_state, self.mesh)
    self.eval_param_shardings = sharding.state_shardings(abstract_state.params, self.eval_mesh)
    self.state = jax.jit(init, out_shardings=self.state_shardings)(init_rng)
    data_shards = self.mesh.shape[sharding.DATA]
    # Of a maxlen-wide batch; a trimmed one may be split in fewer (train_step).
    self.train_microbatches = config.microbatches or microbatches_for(
        config.batch_size // data_shards, config.maxlen)
    loss = loss_options(config, num_items)
    self.step_fn = jax.jit(
        functools.partial(train_step, microbatches=config.microbatches, mesh=self.mesh, **loss),
        in_shardings=(self.state_shardings, self.batch_sharding, self.replicated),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
    # On one host, where windows trim: microbatches of rows of similar length, each cut to
    # its own window (train_on). Several hosts would have to agree on every width.
    self.sorts_microbatches = (self.trims_windows and self.train_microbatches > 1
                               and jax.process_count() == 1)
    self.sorted_step_fn = jax.jit(
        functools.partial(length_sorted_step, mesh=self.mesh, **loss),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
    # Evaluation scores, masks and ranks each device's rows; only the top-k leave it.
    self.rank_fn = jax.jit(
        functools.partial(rank_on_mesh, config=config, mesh=self.eval_mesh,
                          model=self.eval_model, num_items=num_items),
        in_shardings=(self.eval_param_shardings,) + (self.eval_batch_sharding,) * 4,
        out_shardings=NamedSharding(self.eval_mesh, P()))
    self.host_index, self.host_count = sharding.host_slice(self.mesh)
    self.inputs = TrainInput(
        self.dataset.train, maxlen=config.maxlen, batch_size=config.batch_size,
        seed=config.seed, process_index=self.host_index, process_count=self.host_count,
        trim=self.trims_windows, padding_column=self.padding_column)
    self.checkpoints = checkpoint.manager(
        workdir, interval_s=config.get('checkpoint_interval_s', 0))
    self.progress = Progress()
    self.epoch_seconds: dict[str, float] = {}
    self._successive_steps: dict[str, evaluate.SuccessiveSteps] = {}
    self._validation_batches: list[evaluate.EvalBatch] | None = None
    self.watch = faults.PreemptionWatch()  # entered by train_and_evaluate
    if config.trim_windows and not self.trims_windows:
      reason = ('a query-side kernel' if config.mask_padding_keys
                else 'dropout masks drawn by jax.random' if self.padding_column
                else 'padding keys visible')
      logging.info('Training windows stay maxlen wide: with %s, leading padding changes the '
                   'outputs%s.', reason, ' (evaluation keeps a padding column)'
                   if self.evaluation_windows['trim'] else '')

  def restore_latest(self) -> bool:
    step = self.checkpoints.latest_step()
    if step is None:
      return False
    check_same_run(self.config, checkpoint.restore_config(self.workdir), self.workdir)
    self.state, progress = checkpoint.restore(self.checkpoints, step, self.state)
    self.progress = Progress(**progress)
    logging.info('Resumed from step %d (epoch %d done)', step, self.progress.epoch)
    return True

  def restore_best(self) -> None:
    if self.progress.best_step < 0:
      raise FileNotFoundError(f'No validated checkpoint in {self.workdir}')
    self.state, _ = checkpoint.restore(self.checkpoints, self.progress.best_step, self.state)

  @property
  def trims_windows(self) -> bool:
    """Whether batches are cut to the columns they need (config.trim_windows, where exact)."""
    return self.config.trim_windows and self.model.config.trims_in_training

  @property
  def padding_column(self) -> bool:
    """Whether cut windows keep a padding column in every row that is not full: its
    padding keys, all alike, stand for the full window's (models.Encoder)."""
    return self.evaluation_windows['padding_column']

  @property
  def evaluation_windows(self) -> dict[str, bool]:
    """How evaluation cuts its windows (`SuccessiveSteps.batch`'s options): as training does
    or, with visible padding keys that are all alike, keeping a padding column, even where
    training keeps its windows (masks drawn by jax.random); `ModelConfig.evaluation_windows`."""
    return self.eval_model.config.evaluation_windows(self.config.trim_windows)

  def successive_steps(self, part: str) -> evaluate.SuccessiveSteps:
    """The part's evaluation steps, indexed once per run."""
    if part not in self._successive_steps:
      self._successive_steps[part] = evaluate.successive_steps(
          self.dataset, part, maxlen=self.config.maxlen)
    return self._successive_steps[part]

  def pass_batches(self, part: str) -> Iterable[evaluate.EvalBatch]:
    """This host's batches of an evaluation pass over `part`. Those of 'valid', the same
    every epoch, are kept from the first complete pass while they fit
    `VALIDATION_BATCH_BYTES`: on an H200, building them took 56 of a pass's 94 ms (ML-1M)."""
    if part == 'valid' and self._validation_batches is not None:
      return self._validation_batches
    data_shards = self.eval_mesh.shape[sharding.DATA]
    per_host = data_shards // self.host_count
    batches = self.successive_steps(part).pass_batches(
        self.config.eval_batch_size, shards=data_shards,
        held=range(self.host_index * per_host, (self.host_index + 1) * per_host),
        **self.evaluation_windows)
    return self._keeping_validation_batches(batches) if part == 'valid' else batches

  def _keeping_validation_batches(self, batches: Iterable[evaluate.EvalBatch]
                                  ) -> Iterator[evaluate.EvalBatch]:
    kept, size = [], 0
    for batch in batches:
      size += sum(array.nbytes for array in batch)
      if size <= VALIDATION_BATCH_BYTES:
        kept.append(batch)
      yield batch
    # Kept after a complete pass only (an interrupted one stops above), and all of it or none.
    self._validation_batches = kept if size <= VALIDATION_BATCH_BYTES else None

  def rank_batch(self, batch: evaluate.EvalBatch, params=None) -> tuple[jax.Array, jax.Array]:
    """Top-k lists and target ranks of one evaluation batch (this host's rows), dispatched;
    `params` as `eval_params` lays them out (the current ones by default)."""
    arrays = (batch.inputs_BxT, batch.seen_rows_P, batch.seen_items_P, batch.targets_B)
    return self.rank_fn(self.eval_params() if params is None else params,
                        *(self._sharded_rows(a, self.eval_batch_sharding) for a in arrays))

  def eval_params(self, params=None):
    """The parameters (the current ones by default) laid out for evaluation: a copy where
    it runs on more devices than training."""
    return jax.device_put(self.state.params if params is None else params,
                          self.eval_param_shardings)

  def evaluate(self, part: str) -> dict[str, float]:
    """Metrics of the current parameters on `part`; a preemption signal interrupts it
    between batches (evaluate.Interrupted). Each host builds only its rows of a batch."""
    params = self.eval_params()

    def rank(batch: evaluate.EvalBatch):
      faults.die_here('eval_batch')
      return self.rank_batch(batch, params)

    return evaluate.evaluate_ranked(
        rank, self.dataset, part, maxlen=self.config.maxlen,
        batch_size=self.config.eval_batch_size, top_k=self.config.top_k,
        steps=self.successive_steps(part), interrupt=lambda: self.watch.signalled,
        batches=self.pass_batches(part))

  def save(self, metrics: dict | None = None) -> None:
    checkpoint.save(
        self.checkpoints, int(self.state.step), state=self.state,
        progress=dataclasses.asdict(self.progress), config=self.config, metrics=metrics)
    faults.die_here('save')

  def stop_for_preemption(self) -> None:
    """Saves the state at this step boundary and raises faults.Preempted."""
    self.save()
    checkpoint.wait(self.checkpoints)
    step = int(self.state.step)
    raise faults.Preempted(
        f'preempted: saved step {step} in {checkpoint.directory(self.workdir)}; run the same '
        'command again to resume')

  def validation_pending(self) -> bool:
    """The last epoch's training is done and saved but not yet validated."""
    validated = self.progress.history[-1]['epoch'] if self.progress.history else 0
    return self.progress.data_iterator is None and self.progress.epoch > validated

  def _sharded_rows(self, local_rows: np.ndarray, rows_sharding: NamedSharding | None = None
                    ) -> jax.Array:
    """An array sharded over 'data' (training's, by default) from this host's rows of it."""
    return jax.make_array_from_process_local_data(rows_sharding or self.batch_sharding,
                                                  local_rows)

  def _global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: self._sharded_rows(v) for k, v in local_batch.items()}

  def train_on(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """One train step on this host's rows of a batch; its metrics (dispatched, not awaited).

    The batch runs as one program (`step_fn`) or, where `sorts_microbatches`, as
    microbatches of rows of similar history length, each cut to the window its longest
    history needs (`length_sorted_microbatches`): the same gradient, dropout masks included,
    for fewer FLOPs when lengths are spread.
    """
    if not self.sorts_microbatches:
      self.state, metrics = self.step_fn(self.state, self._global_batch(local_batch),
                                         self.dropout_rng)
      return metrics
    self.state, metrics = self.sorted_step_fn(
        self.state, self.sorted_microbatches(local_batch), self.dropout_rng)
    return metrics

  @property
  def _microbatch_positions(self) -> int:
    """Positions per device of a length-sorted microbatch: those of one of
    `train_microbatches` maxlen-wide microbatches."""
    rows_per_device = self.config.batch_size // self.mesh.shape[sharding.DATA]
    return rows_per_device * self.config.maxlen // self.train_microbatches

  def microbatches_of(self, inputs_BxT: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """`train_on`'s length-sorted microbatches of a batch, as `(rows, width)`."""
    return length_sorted_microbatches(
        inputs_BxT, data_shards=self.mesh.shape[sharding.DATA], maxlen=self.config.maxlen,
        positions=self._microbatch_positions, padding_column=self.padding_column)

  @functools.cached_property
  def _stack_layout(self) -> dict[str, dict[int, int]]:
    """`microbatch_stacks`' shapes, the same every step: for each width `window_width` can
    give, the rows of a microbatch and as many slots as a batch could fill."""
    data_shards, maxlen = self.mesh.shape[sharding.DATA], self.config.maxlen
    widths = sorted({window_width(n, maxlen) for n in range(1, maxlen + 1)})
    rows_at = {w: microbatch_rows(w, positions=self._microbatch_positions,
                                  data_shards=data_shards) for w in widths}
    capacity = {w: -(-self.config.batch_size // rows) for w, rows in rows_at.items()}
    return {'rows_at': rows_at, 'capacity': capacity}

  def sorted_microbatches(self, local_batch: dict[str, np.ndarray]) -> dict[int, dict]:
    """A batch as `length_sorted_step` takes it, on the devices: a stack per window width."""
    stacks = microbatch_stacks(local_batch, self.microbatches_of(local_batch['inputs']),
                               **self._stack_layout)
    rows_sharding = NamedSharding(self.mesh, P(None, sharding.DATA))
    return jax.tree.map(
        lambda x: jax.device_put(x, rows_sharding if x.ndim else self.replicated), stacks)

  def train_epoch(self, writer: metric_writer.MetricWriter) -> None:
    """Runs the rest of the current epoch, checkpointing every `checkpoint_every_steps`."""
    config = self.config
    iterator = self.inputs.epoch(self.progress.epoch, self.progress.data_iterator)
    bar = tqdm.tqdm(total=self.inputs.steps_per_epoch,
                    initial=(self.progress.data_iterator or {}).get('next_index', 0),
                    desc=f'epoch {self.progress.epoch + 1}',
                    disable=jax.process_index() != 0 or not logging.level_info(), leave=False)
    log = _TrainLog(writer, bar, config.batch_size)
    step = int(self.state.step)  # counted on the host: reading the state would block
    try:
      for local_batch in iterator:
        metrics = self.train_on(local_batch)
        step += 1
        faults.die_here('step')
        log.add(step, metrics)
        if step % config.log_every_steps == 0:
          log.write(step)
        preempted = self.watch.reached(step)
        if preempted or (config.checkpoint_every_steps
                         and step % config.checkpoint_every_steps == 0):
          log.flush()  # no state is saved before its step's loss is known to be finite
          self.progress.data_iterator = iterator.get_state()
          if preempted:
            self.stop_for_preemption()
          self.save()
      log.flush()
    except faults.NonFiniteLoss as error:
      latest = self.checkpoints.latest_step()
      raise faults.NonFiniteLoss(
          f'{error}; its update was not applied and training stopped. Last good checkpoint: '
          + (f'step {latest} in {checkpoint.directory(self.workdir)}' if latest is not None
             else 'none') + ' (a lower learning_rate may help)') from None
    finally:
      bar.close()
    self.progress.epoch += 1
    self.progress.data_iterator = None

  def validate_and_checkpoint(self, writer: metric_writer.MetricWriter) -> dict[str, float]:
    start = time.perf_counter()
    try:
      metrics = {f'valid/{k}': v for k, v in self.evaluate('valid').items()}
    except evaluate.Interrupted:
      self.stop_for_preemption()  # the epoch's training is saved; validation comes on resume
    self.epoch_seconds['valid'] = time.perf_counter() - start
    step = int(self.state.step)
    ndcg = metrics[checkpoint.BEST_METRIC]
    improved = ndcg > self.progress.best_ndcg
    if improved:
      self.progress.best_ndcg, self.progress.best_step = ndcg, step
      self.progress.bad_validations = 0
    else:
      self.progress.bad_validations += 1
    self.progress.history.append({'epoch': self.progress.epoch, 'step': step, **metrics})
    writer.write(step, {**metrics, 'epoch': self.progress.epoch})
    # The best and the last checkpoints are needed; any other waits for no earlier save and
    # comes `checkpoint_interval_s` after the last. An epoch can take less than a save (on an
    # H200, ML-1M's 0.2 s against 0.3 s): waiting had the loop stall for half of each epoch,
    # and a save's writing slows the next epoch's steps. A skipped save costs only a resume's
    # redoing the epochs since the latest checkpoint, which gives the same result.
    if improved or self.finished() or self.checkpoints.should_save(step):
      self.save(metrics)
    return metrics

  def run_epoch(self, writer: metric_writer.MetricWriter) -> dict[str, float]:
    """Trains one epoch, validates and checkpoints; writes where its time went
    (`time/train_s`, `time/valid_s` and the rest of the epoch, `time/other_s`)."""
    start = time.perf_counter()
    if not self.validation_pending():
      self.train_epoch(writer)
    self.epoch_seconds['train'] = time.perf_counter() - start
    metrics = self.validate_and_checkpoint(writer)
    total = time.perf_counter() - start
    train_s, valid_s = self.epoch_seconds['train'], self.epoch_seconds['valid']
    writer.write(int(self.state.step), {'time/train_s': train_s, 'time/valid_s': valid_s,
                                        'time/other_s': total - train_s - valid_s})
    return metrics

  def finished(self) -> bool:
    return (self.progress.epoch >= self.config.max_epochs
            or self.progress.bad_validations >= self.config.patience)


class _TrainLog:
  """Train loss and throughput, read one step late so that dispatch stays ahead."""

  def __init__(self, writer: metric_writer.MetricWriter, bar: tqdm.tqdm, batch_size: int):
    self.writer, self.bar, self.batch_size = writer, bar, batch_size
    self.pending: tuple[int, dict[str, jax.Array]] | None = None
    self._reset()

  def _reset(self) -> None:
    self.loss_sum, self.loss_count, self.steps, self.start = 0.0, 0.0, 0, time.perf_counter()

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.flush()
    self.pending = step, metrics
    self.bar.update(1)

  def flush(self) -> None:
    """Reads the pending step's metrics; stops the run on a non-finite loss."""
    if self.pending is None:
      return
    step, metrics = self.pending
    self.pending = None
    loss_sum, loss_count, finite = jax.device_get(
        (metrics['loss_sum'], metrics['loss_count'], metrics['finite']))
    loss_sum, loss_count = float(loss_sum), float(loss_count)
    if not finite:
      raise faults.NonFiniteLoss(f'non-finite loss or gradient at step {step} (loss sum '
                                 f'{loss_sum})')
    self.loss_sum, self.loss_count, self.steps = (
        self.loss_sum + loss_sum, self.loss_count + loss_count, self.steps + 1)

  def write(self, step: int) -> None:
    """Writes the mean loss and sequences/s of the steps read since the last write."""
    if not self.loss_count:
      return
    scalars = {'train/loss': self.loss_sum / self.loss_count,
               'train/sequences_per_s':
                   self.steps * self.batch_size / (time.perf_counter() - self.start)}
    self.writer.write(step, scalars)
    self.bar.set_postfix(loss=f'{scalars["train/loss"]:.4f}',
                         seq_per_s=f'{scalars["train/sequences_per_s"]:.0f}')
    self._reset()


def _write_json_atomic(path: str, payload: dict) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def test_best(run: Run) -> dict[str, dict[str, float]]:
  """Validation and test metrics of the best checkpoint, also written to results.json."""
  run.restore_best()
  try:
    test = run.evaluate('test')
  except evaluate.Interrupted:
    raise faults.Preempted('preempted while testing the best checkpoint, which is saved: run '
                           'the same command again to finish') from None
  results = {'best_step': run.progress.best_step, 'epochs': run.progress.epoch,
             'valid': run.progress.best_validation(), 'test': test}
  if jax.process_index() == 0:
    _write_json_atomic(os.path.join(run.workdir, 'results.json'), results)
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       train_devices: int | None = None) -> dict:
  """Trains until early stopping (resuming from the latest checkpoint), then tests the best.
  `train_devices`: as `Run`'s."""
  run = Run(config, workdir, train_devices=train_devices)
  run.restore_latest()
  # Records past the restored step come from work the resumed run does again.
  writer = metric_writer.MetricWriter(workdir, after_step=int(run.state.step))
  logging.info('%d training users, %d items, %d steps per epoch', len(run.inputs.users),
               run.dataset.num_items, run.inputs.steps_per_epoch)
  try:
    with run.watch:
      while not run.finished():
        metrics = run.run_epoch(writer)
        logging.info('epoch %d: valid ndcg@10 %.4f (best %.4f at step %d)', run.progress.epoch,
                     metrics[checkpoint.BEST_METRIC], run.progress.best_ndcg,
                     run.progress.best_step)
      checkpoint.wait(run.checkpoints)
      results = test_best(run)
    recommend.write_serving_files(workdir, run.dataset)  # the workdir alone can recommend
    writer.write(run.progress.best_step, {f'test/{k}': v for k, v in results['test'].items()})
  finally:
    writer.close()
    run.checkpoints.close()
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        train_devices: int | None = None) -> dict:
  """Restores the best checkpoint of `workdir` and evaluates it without training."""
  run = Run(config, workdir, train_devices=train_devices)
  try:
    if not run.restore_latest():
      raise FileNotFoundError(f'No checkpoint in {os.path.join(workdir, "checkpoints")}')
    results = test_best(run)
    recommend.write_serving_files(workdir, run.dataset)
    return results
  finally:
    run.checkpoints.close()
