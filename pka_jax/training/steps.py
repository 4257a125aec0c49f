"""The train step, a pure function `(state, batch, rng) -> (state, metrics)`: the loss over a
batch's real targets, its gradient (accumulated over microbatches where asked) and one Adam
step. Metrics leave as sums and counts."""

from __future__ import annotations

from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pka_jax import sharding
from pka_jax.kernels import dispatch
from pka_jax.model import item_table
from pka_jax.training import losses
from pka_jax.training import optimizer
from pka_jax.training.microbatching import microbatches_for, split_microbatches


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
    local = dispatch.cross_entropy(impl=ce_impl, block_size=ce_block_size,
                                   chunk_rows=ce_chunk_rows)
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


def loss_options(config, num_items: int) -> dict[str, Any]:
  """`train_step`'s loss arguments from `config` (a ConfigDict or a placement.ProgramSpec)."""
  return {'loss_name': config.loss, 'ce_block_size': config.ce_block_size,
          'ce_chunk_rows': config.ce_chunk_rows, 'ce_impl': config.ce_impl,
          'num_items': num_items}


def _sharded_loss_sums(hidden_BxTxD, table_VxD, targets_BxT, *, mesh, num_items, block_size):
  """The cross-entropy with the table's rows split over 'model' (losses.sharded_cross_entropy)."""
  rows_per_shard = table_VxD.shape[0] // mesh.shape[sharding.MODEL]
  positions = targets_BxT.size // mesh.shape[sharding.DATA]
  block = block_size or item_table.chunk_rows_for(positions, rows_per_shard)

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


def _apply_summed_gradients(state: train_state.TrainState, learning_rate: jax.Array,
                            grads, total, count
                            ) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One Adam step on the mean loss, from the gradient of the loss sum and the target count."""
  grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
  state = optimizer.apply_learning_rate(state, grads, learning_rate)
  finite = jnp.isfinite(total) & state.opt_state.last_finite
  return state, {'loss_sum': total, 'loss_count': count, 'finite': finite}


def train_step(state: train_state.TrainState, batch: dict[str, jax.Array], rng: jax.Array,
               learning_rate: jax.Array, *, loss_name: str, ce_block_size: int = 0,
               ce_chunk_rows: int = 0, ce_impl: str = 'xla', microbatches: int = 1,
               mesh: jax.sharding.Mesh | None = None, num_items: int | None = None,
               ) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One Adam step at `learning_rate` on the mean loss over the batch; metrics leave as sums
  and counts.

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
  return _apply_summed_gradients(state, learning_rate, *sums)


def length_sorted_step(state: train_state.TrainState, microbatches: dict[int, dict],
                       rng: jax.Array, learning_rate: jax.Array, *,
                       mesh: jax.sharding.Mesh | None = None, **loss
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
    return _apply_summed_gradients(state, learning_rate, *sums)

  def per_device(params, microbatches, step_rng):
    # Varying copies: their gradients stay per device until the one psum below.
    params, start = jax.lax.pcast((params, _zero_sums(params)), sharding.DATA, to='varying')
    sums = _sorted_sums(params, state.apply_fn, microbatches, step_rng, start, mesh=None,
                        **loss)
    return jax.tree.map(lambda x: jax.lax.psum(x, sharding.DATA), sums)

  stacks_spec = jax.tree.map(lambda x: P(None, sharding.DATA) if x.ndim else P(), microbatches)
  sums = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), stacks_spec, P()),
                       out_specs=P())(state.params, microbatches, step_rng)
  return _apply_summed_gradients(state, learning_rate, *sums)


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
