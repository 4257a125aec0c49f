"""The item table split over a 'model' mesh axis: the same losses, parameters and top-k lists."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from configs import test as test_config
from pka_jax import sharding
from pka_jax.evaluation import ranking
from pka_jax.model import encoder
from pka_jax.model import item_table
from pka_jax.training import losses
from pka_jax.training.loop import Trainer


def run_with(devices: int, mesh_model: int, tmp_path) -> dict:
  """Three steps and a validation pass of configs/test.py on the first `devices` of this
  process's eight CPU devices, the item table split `mesh_model` ways."""
  config = test_config.get_config()
  config.dropout = 0.0  # dropout bits may depend on the sharding; the arithmetic must not
  # Histories of at most 16 items in 32-wide windows: every batch, training and evaluation,
  # runs trimmed (to 16 or 8 columns) on every mesh.
  config.maxlen, config.synthetic.max_length = 32, 16
  # Two microbatches a step: on one host they are length-sorted (Trainer.train_on), their
  # rows grouped differently on each mesh.
  config.microbatches = 2
  config.mesh_model = mesh_model
  config.data_dir = str(tmp_path / 'data')
  run = Trainer.create(config, str(tmp_path / f'run{devices}x{mesh_model}'),
                       devices=jax.devices()[:devices])
  step_losses, widths = [], []
  for batch in list(run.inputs.epoch(0))[:3]:
    widths.append(batch['inputs'].shape[1])
    metrics = run.train_on(batch)
    step_losses.append(float(metrics['loss_sum'] / metrics['loss_count']))
  steps = run.evaluator.steps('valid')
  params = run.placement.eval_params(run.state.params)
  top = []
  for batch in steps.batches(config.eval_batch_size, shards=run.placement.mesh.shape['data']):
    items, _ = run.placement.rank(params, batch)
    top.append(np.asarray(items)[batch.valid_B])
  leaves = jax.tree_util.tree_flatten_with_path(run.state.params)[0]
  table = run.state.params['item_emb']['embedding']
  return {'losses': step_losses, 'widths': widths, 'mesh': dict(run.placement.mesh.shape),
          'sorts_microbatches': run.placement.sorts_microbatches,
          'table_shard_rows': table.addressable_shards[0].data.shape[0],
          'valid': run.evaluate('valid'),
          'arrays': {'top': np.concatenate(top),
                     **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}}}


def test_meshes_with_a_model_axis_train_and_rank_like_one_device(tmp_path):
  one = run_with(1, 1, tmp_path)
  assert one['sorts_microbatches']
  # 60 items + padding = 61 rows: split 4 ways they pad to 64, 16 rows a shard. Data 2 x
  # model 4: both axes at once (the model axis alone is its special case).
  for devices, mesh_model, shard_rows in ((8, 4, 16),):
    sharded = run_with(devices, mesh_model, tmp_path)
    assert sharded['mesh'] == {'data': devices // mesh_model, 'model': mesh_model}
    assert sharded['table_shard_rows'] == shard_rows and sharded['sorts_microbatches']
    assert max(sharded['widths']) < 32 and sharded['widths'] == one['widths']
    np.testing.assert_allclose(sharded['losses'], one['losses'], rtol=1e-5)
    for path, leaf in one['arrays'].items():
      got = sharded['arrays'][path]
      if path == 'top':
        np.testing.assert_array_equal(got, leaf)
        continue
      if "['item_emb']" in path:
        np.testing.assert_array_equal(got[len(leaf):], 0.0)  # unused rows: never trained
        got = got[:len(leaf)]
      # atol: the key biases' true gradient is zero; they hold rounding noise that Adam scales.
      atol = 1e-3 if "['key']['bias']" in path else 1e-6
      np.testing.assert_allclose(got, leaf, rtol=1e-4, atol=atol, err_msg=path)
    assert sharded['valid'] == pytest.approx(one['valid'], abs=1e-6)


MESH = sharding.make_mesh(4, jax.devices()[:8])  # data 2 x model 4 (conftest: 8 CPU devices)
N, D = 21, 8  # 22 rows with padding: not a multiple of the 4 shards


def place(array, spec):
  return jax.device_put(array, NamedSharding(MESH, spec))


def sharded_loss(hidden_BxTxD, table_VxD, targets_BxT, block_size, chunk_rows=0):
  def per_device(hidden, table, targets):
    table = jax.lax.pcast(table, sharding.DATA, to='varying')
    total, count = losses.sharded_cross_entropy(hidden, table, targets, num_items=N,
                                                block_size=block_size, chunk_rows=chunk_rows)
    return jax.lax.psum(total, sharding.DATA), jax.lax.psum(count, sharding.DATA)

  return jax.shard_map(per_device, mesh=MESH, in_specs=(P('data'), P('model'), P('data')),
                       out_specs=P())(hidden_BxTxD, table_VxD, targets_BxT)


@pytest.mark.parametrize('block_size,chunk_rows', [(1, 0), (3, 0), (6, 0), (3, 2)])
@pytest.mark.parametrize('targets_from', ['everywhere', 'first_shard_only'])
def test_sharded_loss_and_gradients_equal_the_full_ones(block_size, chunk_rows, targets_from):
  keys = jax.random.split(jax.random.key(0), 3)
  rows = item_table.table_rows(N, 4)  # 24: rows 22 and 23 are unused
  table = jax.random.normal(keys[0], (rows, D)).at[N + 1:].set(0.0)
  hidden = jax.random.normal(keys[1], (4, 5, D))
  high = 6 if targets_from == 'first_shard_only' else N + 1  # shard 0 holds rows 0..5
  # Left padding: each device holds 6 real targets and 4 padding rows, so with chunks of 2
  # rows it skips two chunks. Not even a NaN in those rows may reach the loss or gradients.
  targets = jax.random.randint(keys[2], (4, 5), 1, high).at[0::2, :4].set(0)
  real = (targets > 0)[..., None]

  def full(h, e):
    return losses.full_cross_entropy(h, e[:N + 1], targets)[0]

  def sharded(h, e):
    return sharded_loss(h, e, place(targets, P('data')), block_size, chunk_rows)[0]

  poisoned = jnp.where(real, hidden, jnp.nan) if chunk_rows else hidden
  hidden = jnp.where(real, hidden, 0.0)
  args = place(poisoned, P('data')), place(table, P('model'))
  np.testing.assert_allclose(jax.jit(sharded)(*args), full(hidden, table), rtol=1e-5)
  want = jax.grad(full, argnums=(0, 1))(hidden, table)
  got = jax.jit(jax.grad(sharded, argnums=(0, 1)))(*args)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)
  assert got[1].sharding.spec == P('model')  # each shard's rows' gradient stayed there


@pytest.mark.parametrize('block_size,top_k', [(2, 5), (6, 5), (6, 12)])
def test_sharded_top_k_equals_the_dense_top_k(block_size, top_k):
  keys = jax.random.split(jax.random.key(1), 3)
  rows = item_table.table_rows(N, 4)
  table = jax.random.normal(keys[0], (rows, D))
  hidden = jax.random.normal(keys[1], (4, D))
  targets = jnp.array([3, 21, 9, 0], jnp.int32)
  # Rows 0-1 on the first 'data' shard, 2-3 on the second; pairs list rows within a shard.
  seen = [[1, 2, 3], [5], list(range(1, 18)), []]
  width = 32
  rows_P, items_P = [], []
  for shard in (seen[:2], seen[2:]):
    pairs = [(r, i) for r, items in enumerate(shard) for i in items]
    pairs += [(0, 0)] * (width - len(pairs))
    rows_P += [r for r, _ in pairs]
    items_P += [i for _, i in pairs]
  top = functools.partial(ranking.sharded_top_k, num_items=N, top_k=top_k,
                          block_size=block_size)
  got = jax.jit(jax.shard_map(
      top, mesh=MESH, in_specs=(P('data'), P('model'), P('data'), P('data'), P('data')),
      out_specs=(P('data'), P('data'))))(
          place(hidden, P('data')), place(table, P('model')),
          *(place(jnp.array(a, jnp.int32), P('data')) for a in (rows_P, items_P)),
          place(targets, P('data')))
  seen_BxS = np.zeros((4, 17), np.int32)
  for row, items in enumerate(seen):
    seen_BxS[row, :len(items)] = items
  want = ranking.top_k_ranks(hidden @ table[:N + 1].T, seen_BxS, targets, top_k=top_k)
  np.testing.assert_array_equal(got[0], want[0])  # top_k 12 > 4 items left in row 2: zeros
  np.testing.assert_array_equal(got[1], want[1])


def encoder_sum_and_grads(mesh, rows: int):
  """A training encoder's (dropout on) weighted sum of hidden states over `rows` sequences
  and its gradients, jitted with the table split over `mesh` (or on one device, None); and
  XLA's FLOPs per device for it."""
  config = test_config.get_config()
  config.mesh_model = 4  # the same padded table either way
  model = encoder.create_model(config, N, deterministic=False, mesh=mesh)
  keys = jax.random.split(jax.random.key(2), 4)
  inputs = jax.random.randint(keys[0], (rows, config.maxlen), 1, N + 1)
  inputs = inputs * (jnp.arange(config.maxlen)[None] >= jnp.arange(rows)[:, None] % 5)  # left pad
  unsplit = encoder.create_model(config, N, deterministic=True)
  params = unsplit.init(keys[1], inputs[:1])['params']
  weights = jax.random.normal(keys[2], (rows, config.maxlen, config.hidden_units))

  def total(params, inputs):
    hidden = model.apply({'params': params}, inputs, rngs={'dropout': keys[3]})
    return jnp.sum(hidden * weights)

  step = jax.jit(jax.value_and_grad(total))
  if mesh is not None:
    params = jax.device_put(params, sharding.state_shardings(params, mesh))
    inputs = jax.device_put(inputs, NamedSharding(mesh, P('data')))
  compiled = step.lower(params, inputs).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return compiled(params, inputs), cost['flops']


@pytest.mark.parametrize('rows', [16, 6])
def test_the_encoder_splits_its_rows_over_both_axes(rows):
  # 16 sequences: two on each of the eight devices; were each 'model' shard to encode its
  # whole 'data' shard, every device would do a quarter of the work, not an eighth. 6 do not
  # divide over 8 devices: each 'data' shard encodes its 3 on all four of its devices.
  (value, grads), flops = encoder_sum_and_grads(MESH, rows)
  (want_value, want_grads), one_device_flops = encoder_sum_and_grads(None, rows)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(want_grads)[0],
                               jax.tree.leaves(grads)):
    if "['key']['bias']" not in jax.tree_util.keystr(path):  # true gradient zero: noise only
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5,
                                 err_msg=jax.tree_util.keystr(path))
  devices_sharing_rows = 8 if rows % 8 == 0 else 2
  assert flops * devices_sharing_rows == pytest.approx(one_device_flops, rel=0.2)
