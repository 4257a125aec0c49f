"""Training losses over the tied item table. Each returns `(sum, count)` over real targets.

Three exact implementations of the full-catalog cross-entropy, one definition:

* `full_cross_entropy`: all `B·T × N` logits at once, differentiated by JAX (the reference);
* `chunked_cross_entropy` (the default): rows in chunks whose logits fit in cache, the
  gradients computed in the same pass as the loss, so no logits are ever stored or recomputed;
* `blockwise_cross_entropy`: items in blocks, for catalogs whose logits for even a few rows
  would not fit (memory of one tile of logits; a third more FLOPs, the logits recomputed
  backward). `sharded_cross_entropy` is the same loop on each device's rows of a table
  split over devices.

All but the first sort the real targets first and skip the chunks of rows that hold none: a
batch costs the catalog products of its real positions, however much of its windows is
padding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pka_jax import sharding
from pka_jax.model.item_table import chunk_rows_for, even_blocks, item_block

def full_cross_entropy(
    hidden_BxTxD: jax.Array, item_emb_VxD: jax.Array, targets_BxT: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy over the whole catalog `1..N`; the padding id is not a class."""
  logits_BxTxN = jnp.dot(hidden_BxTxD, item_emb_VxD[1:].T.astype(hidden_BxTxD.dtype),
                         preferred_element_type=jnp.float32)
  log_z_BxT = jax.nn.logsumexp(logits_BxTxN, axis=-1)
  class_BxT = jnp.maximum(targets_BxT - 1, 0)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxN, class_BxT[..., None], axis=-1)[..., 0]
  weight_BxT = (targets_BxT > 0).astype(logits_BxTxN.dtype)
  return jnp.sum((log_z_BxT - target_logit_BxT) * weight_BxT), jnp.sum(weight_BxT)


def sampled_bce(
    hidden_BxTxD: jax.Array,
    item_emb_VxD: jax.Array,
    targets_BxT: jax.Array,
    rng: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Original SASRec loss: the target against one uniformly sampled negative per position."""
  num_items = item_emb_VxD.shape[0] - 1
  negatives_BxT = jax.random.randint(rng, targets_BxT.shape, 1, num_items + 1)
  positive_BxT = jnp.einsum('btd,btd->bt', hidden_BxTxD, item_emb_VxD[targets_BxT])
  negative_BxT = jnp.einsum('btd,btd->bt', hidden_BxTxD, item_emb_VxD[negatives_BxT])
  weight_BxT = (targets_BxT > 0).astype(hidden_BxTxD.dtype)
  loss_BxT = -jax.nn.log_sigmoid(positive_BxT) - jax.nn.log_sigmoid(-negative_BxT)
  return jnp.sum(loss_BxT * weight_BxT), jnp.sum(weight_BxT)


def blockwise_cross_entropy(
    hidden_BxTxD: jax.Array, item_emb_VxD: jax.Array, targets_BxT: jax.Array, block_size: int,
    chunk_rows: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """`full_cross_entropy` without the `B×T×N` logits: items are scored `block_size` at a time.

  Exact. Each block of the table is read once forward and once backward, and its gradient
  written once, in place: the loops run over the blocks, and within a block over chunks of
  `chunk_rows` rows (0: `chunk_rows_for` the block), real targets first, up to the last
  chunk holding one, so padding costs no catalog products. Forward keeps a running
  log-sum-exp per position; backward recomputes each block's softmax, so memory holds one
  `rows × block_size` tile of logits at a time.
  """
  return _blockwise(hidden_BxTxD, item_emb_VxD, targets_BxT, block_size=block_size,
                    chunk_rows=chunk_rows, num_items=item_emb_VxD.shape[0] - 1, axis=None)


def sharded_cross_entropy(
    hidden_BxTxD: jax.Array, table_RxD: jax.Array, targets_BxT: jax.Array, *,
    num_items: int, block_size: int, chunk_rows: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """`blockwise_cross_entropy` inside shard_map over ('data', 'model'), the item table's rows
  split over 'model' (sharding.py).

  Each shard scores its rows `[first, first + R)` of the table; the shards' log-sum-exps
  meet in a `pmax` and a `psum` of one number per position, the target logit in a `psum`
  from the shard that holds it. The table's gradient stays on its shard, the hidden states'
  gradient is summed over 'model'. Rows outside `1..num_items` never score. Every 'model'
  shard holds the same positions, so their loops run alike and the collectives, outside
  them, line up.
  """
  return _blockwise(hidden_BxTxD, table_RxD, targets_BxT, block_size=block_size,
                    chunk_rows=chunk_rows, num_items=num_items, axis=sharding.MODEL)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How `_blockwise_nll_sum` walks the table: blocks of `block_size` rows (the last one
  moved back to end with the table), chunks of `rows` positions; ids `1..num_items` score;
  `axis`, if any, is the mesh axis the table's rows are split over."""
  block_size: int
  rows: int
  num_items: int
  axis: str | None


def _blockwise(hidden_BxTxD, table_VxD, targets_BxT, *, block_size, chunk_rows, num_items,
               axis):
  rows = chunk_rows or chunk_rows_for(block_size, targets_BxT.size)
  hidden_MxD, targets_M, weight_M = _real_rows_first(hidden_BxTxD, targets_BxT, rows)
  if axis is not None:  # a varying copy: its gradient, per shard, is summed over `axis`
    hidden_MxD = jax.lax.pcast(hidden_MxD, axis, to='varying')
  plan = _Plan(even_blocks(table_VxD.shape[0], block_size), rows, num_items, axis)
  total = _blockwise_nll_sum(hidden_MxD, table_VxD, targets_M, weight_M, plan)
  return total, jnp.sum(weight_M)


def _first_item(table_VxD, plan: _Plan):
  """The item id of this device's first row of the table."""
  return 0 if plan.axis is None else sharding.shard_range(table_VxD.shape[0])


def _block_logits(hidden_RxD, block_KxD, scores_K):
  logits_RxK = jnp.dot(hidden_RxD, block_KxD.T, preferred_element_type=jnp.float32)
  return jnp.where(scores_K[None, :], logits_RxK, -jnp.inf)


def _walk(table_VxD, weight_M, plan: _Plan, dtype, carry, chunk_step):
  """`carry` through `chunk_step(carry, block, chunk_start)` for every block (`item_block`'s
  start, rows in `dtype` and scores) and every chunk of rows `_chunks_with_targets` visits,
  blocks outermost."""
  chunks = _chunks_with_targets(weight_M, plan.rows)
  blocks = -(-table_VxD.shape[0] // plan.block_size)
  first = _first_item(table_VxD, plan)

  def over_block(index, carry):
    start, block_KxD, _, scores_K = item_block(table_VxD, index, plan.block_size, first,
                                               plan.num_items, dtype)
    block = start, block_KxD, scores_K
    return jax.lax.fori_loop(
        0, chunks, lambda c, carry: chunk_step(carry, block, c * plan.rows), carry)

  return jax.lax.fori_loop(0, blocks, over_block, carry)


def _held_targets(table_VxD, targets_M, plan: _Plan):
  """Each target's row on this device, and whether it holds it."""
  rows = table_VxD.shape[0]
  row_M = targets_M - _first_item(table_VxD, plan)
  held_M = (targets_M > 0) & (row_M >= 0) & (row_M < rows)
  return jnp.clip(row_M, 0, rows - 1), held_M


def _sum_over(x, plan: _Plan):
  return x if plan.axis is None else jax.lax.psum(x, plan.axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise_nll_sum(hidden_MxD, table_VxD, targets_M, weight_M, plan: _Plan):
  return _blockwise_forward(hidden_MxD, table_VxD, targets_M, weight_M, plan)[0]


def _blockwise_forward(hidden_MxD, table_VxD, targets_M, weight_M, plan: _Plan):
  rows = plan.rows

  def chunk_step(carry, block, at):
    max_M, sum_M = carry
    _, block_KxD, scores_K = block
    hidden_RxD, old_max_R, old_sum_R = _rows_at(at, rows, hidden_MxD, max_M, sum_M)
    logits_RxK = _block_logits(hidden_RxD, block_KxD, scores_K)
    new_max_R = jnp.maximum(old_max_R, logits_RxK.max(axis=1))
    shift_R = jnp.where(jnp.isfinite(new_max_R), new_max_R, 0.0)  # nothing scored yet
    sum_R = (old_sum_R * jnp.exp(old_max_R - shift_R)
             + jnp.exp(logits_RxK - shift_R[:, None]).sum(axis=1))
    return (jax.lax.dynamic_update_slice_in_dim(max_M, new_max_R, at, 0),
            jax.lax.dynamic_update_slice_in_dim(sum_M, sum_R, at, 0))

  # Shaped like the rows (full_like): under shard_map the carries vary as they do.
  start = (jnp.full_like(hidden_MxD[:, 0], -jnp.inf, jnp.float32),
           jnp.zeros_like(hidden_MxD[:, 0], jnp.float32))
  max_M, sum_M = _walk(table_VxD, weight_M, plan, hidden_MxD.dtype, start, chunk_step)
  if plan.axis is not None:
    global_max_M = jax.lax.pmax(max_M, plan.axis)
    shift_M = jnp.where(jnp.isfinite(global_max_M), global_max_M, 0.0)
    sum_M = jax.lax.psum(sum_M * jnp.exp(max_M - shift_M), plan.axis)
    max_M = shift_M
  log_z_M = max_M + jnp.log(sum_M)
  row_M, held_M = _held_targets(table_VxD, targets_M, plan)
  target_logit_M = _sum_over(jnp.where(held_M, jnp.einsum(
      'md,md->m', hidden_MxD, table_VxD[row_M].astype(hidden_MxD.dtype),
      preferred_element_type=jnp.float32), 0.0), plan)
  # Rows without a target add nothing (where, not a product: nothing of theirs is read).
  total = jnp.sum(jnp.where(weight_M > 0, log_z_M - target_logit_M, 0.0))
  return total, (hidden_MxD, table_VxD, targets_M, weight_M, log_z_M)


def _blockwise_backward(plan: _Plan, residuals, grad_total):
  hidden_MxD, table_VxD, targets_M, weight_M, log_z_M = residuals
  dtype, rows = hidden_MxD.dtype, plan.rows
  scale_M = grad_total * weight_M

  def chunk_step(carry, block, at):
    grad_hidden_MxD, grad_table_VxD = carry
    start, block_KxD, scores_K = block
    hidden_RxD, log_z_R, scale_R, grad_hidden_RxD = _rows_at(
        at, rows, hidden_MxD, log_z_M, scale_M, grad_hidden_MxD)
    # d(loss)/d(logits) = softmax - onehot; the softmax part here, the onehot part below.
    probs_RxK = jnp.exp(_block_logits(hidden_RxD, block_KxD, scores_K) - log_z_R[:, None])
    probs_RxK = (probs_RxK * scale_R[:, None]).astype(dtype)
    grad_hidden_RxD += jnp.dot(probs_RxK, block_KxD, preferred_element_type=jnp.float32)
    # Rows the block does not score get zeros: adding them keeps what the block before put.
    grad_block_KxD = (jax.lax.dynamic_slice_in_dim(grad_table_VxD, start, plan.block_size)
                      + jnp.einsum('rk,rd->kd', probs_RxK, hidden_RxD,
                                   preferred_element_type=jnp.float32))
    return (jax.lax.dynamic_update_slice_in_dim(grad_hidden_MxD, grad_hidden_RxD, at, 0),
            jax.lax.dynamic_update_slice_in_dim(grad_table_VxD, grad_block_KxD, start, 0))

  # Shaped like the rows and the table: under shard_map they vary as those do.
  start = (jnp.zeros_like(hidden_MxD, jnp.float32), jnp.zeros_like(table_VxD, jnp.float32))
  grad_hidden_MxD, grad_table_VxD = _walk(table_VxD, weight_M, plan, dtype, start, chunk_step)
  row_M, held_M = _held_targets(table_VxD, targets_M, plan)
  target_scale_M = jnp.where(held_M, scale_M, 0.0)
  grad_hidden_MxD = grad_hidden_MxD - target_scale_M[:, None] * table_VxD[row_M]
  grad_table_VxD = grad_table_VxD.at[row_M].add(jnp.where(
      held_M[:, None], -target_scale_M[:, None] * hidden_MxD.astype(jnp.float32), 0.0))
  return grad_hidden_MxD.astype(dtype), grad_table_VxD.astype(table_VxD.dtype), None, None


_blockwise_nll_sum.defvjp(_blockwise_forward, _blockwise_backward)


def chunked_cross_entropy(
    hidden_BxTxD: jax.Array, item_emb_VxD: jax.Array, targets_BxT: jax.Array,
    chunk_rows: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """`full_cross_entropy` over chunks of `chunk_rows` rows (0: `chunk_rows_for`).

  Differentiated, each chunk's softmax becomes its gradient in place and meets the item table
  and the hidden states at once (`g E` and `hᵀ g`): one pass, one chunk of logits in memory.
  Logits and softmax are float32 whatever the activations' dtype.
  """
  rows = chunk_rows or chunk_rows_for(item_emb_VxD.shape[0] - 1, targets_BxT.size)
  hidden_MxD, targets_M, weight_M = _real_rows_first(hidden_BxTxD, targets_BxT, rows)
  total = _chunked_nll_sum(hidden_MxD, item_emb_VxD, targets_M, weight_M, rows)
  return total, jnp.sum(weight_M)


def _real_rows_first(hidden_BxTxD: jax.Array, targets_BxT: jax.Array, rows: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Positions as rows `(hidden_MxD, targets_M, weight_M)`, real targets first (a stable
  sort) and padded to whole chunks of `rows`: the chunks after the real rows hold none, and
  on CPU the losses' loops stop before them (`_chunks_with_targets`), so padding costs no
  catalog products. Rows that fit one chunk (an accelerator's whole batch) keep their order: there
  is no chunk to skip, and the sort and gather took ~60 µs of a 2.5 ms step on an H200 (the
  gather's gradient is a scatter)."""
  hidden_MxD = hidden_BxTxD.reshape(-1, hidden_BxTxD.shape[-1])
  targets_M = targets_BxT.reshape(-1)
  if targets_M.shape[0] > rows:
    order_M = jnp.argsort(targets_M <= 0, stable=True)
    hidden_MxD, targets_M = hidden_MxD[order_M], targets_M[order_M]
  pad = -targets_M.shape[0] % rows
  hidden_MxD, targets_M = jnp.pad(hidden_MxD, ((0, pad), (0, 0))), jnp.pad(targets_M, (0, pad))
  return hidden_MxD, targets_M, (targets_M > 0).astype(jnp.float32)


def _rows_at(at, rows: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Rows `[at, at + rows)` of each of `arrays` (a chunk of positions)."""
  return tuple(jax.lax.dynamic_slice_in_dim(x, at, rows) for x in arrays)


def _chunks_with_targets(weight_M: jax.Array, rows: int) -> int | jax.Array:
  """How many chunks of `rows` rows the losses' loops visit: on CPU those up to the last real
  target (real targets come first), a count the loop reads on the device; elsewhere every
  chunk, a count known when compiling. A GPU reads a loop's count back to the host each
  trip, and an accelerator's chunk is most of a batch (one, at ML-1M's shapes), where a
  padding chunk rarely exists to skip."""
  chunks = weight_M.shape[0] // rows
  if chunks == 1 or jax.default_backend() != 'cpu':
    return chunks
  return (jnp.sum(weight_M > 0).astype(jnp.int32) + rows - 1) // rows


def _chunk_softmax(hidden_RxD, items_NxD, targets_R):
  """Logits' exponentials (shifted by the row max), their row sums, the log-sum-exp and the
  target logit of one chunk; all float32."""
  logits_RxN = jnp.dot(hidden_RxD, items_NxD.T, preferred_element_type=jnp.float32)
  max_Rx1 = jnp.max(logits_RxN, axis=1, keepdims=True)
  exp_RxN = jnp.exp(logits_RxN - max_Rx1)
  sum_Rx1 = jnp.sum(exp_RxN, axis=1, keepdims=True)
  log_z_R = (max_Rx1 + jnp.log(sum_Rx1))[:, 0]
  # From the targets' rows of the table, not picked out of the logits: one pass less over
  # the chunk's `R×N` floats (padding rows, target 0, take item 1's row; their weight is 0).
  target_rows_RxD = items_NxD[jnp.maximum(targets_R - 1, 0)]
  target_logit_R = jnp.einsum('rd,rd->r', hidden_RxD, target_rows_RxD,
                              preferred_element_type=jnp.float32)
  return exp_RxN, sum_Rx1, log_z_R, target_logit_R


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_nll_sum(hidden_MxD, item_emb_VxD, targets_M, weight_M, rows):
  items_NxD = item_emb_VxD[1:].astype(hidden_MxD.dtype)

  def add_chunk(index, total):
    at = index * rows
    hidden_RxD, targets_R, weight_R = _rows_at(at, rows, hidden_MxD, targets_M, weight_M)
    _, _, log_z_R, target_logit_R = _chunk_softmax(hidden_RxD, items_NxD, targets_R)
    return total + jnp.sum((log_z_R - target_logit_R) * weight_R)

  # Shaped like the rows (zeros_like): under shard_map the carry varies as they do.
  return jax.lax.fori_loop(0, _chunks_with_targets(weight_M, rows), add_chunk,
                           jnp.zeros_like(weight_M[0]))


def _chunked_forward(hidden_MxD, item_emb_VxD, targets_M, weight_M, rows):
  dtype = hidden_MxD.dtype
  items_NxD = item_emb_VxD[1:].astype(dtype)

  def add_chunk(index, carry):
    grad_items_DxN, total, grad_hidden_MxD = carry
    at = index * rows
    hidden_RxD, targets_R, weight_R = _rows_at(at, rows, hidden_MxD, targets_M, weight_M)
    exp_RxN, sum_Rx1, log_z_R, target_logit_R = _chunk_softmax(hidden_RxD, items_NxD,
                                                               targets_R)
    onehot_RxN = jnp.arange(items_NxD.shape[0])[None, :] == (targets_R - 1)[:, None]
    # d nll / d logits = (softmax - onehot) * weight
    grad_RxN = (exp_RxN * (weight_R[:, None] / sum_Rx1)
                - jnp.where(onehot_RxN, weight_R[:, None], 0.0)).astype(dtype)
    grad_hidden_RxD = jnp.dot(grad_RxN, items_NxD, preferred_element_type=jnp.float32)
    # hᵀ g, not gᵀ h: the contraction runs over the chunk's rows without transposing g.
    grad_items_DxN += jnp.einsum('rd,rn->dn', hidden_RxD, grad_RxN,
                                 preferred_element_type=jnp.float32)
    total += jnp.sum((log_z_R - target_logit_R) * weight_R)
    return (grad_items_DxN, total, jax.lax.dynamic_update_slice_in_dim(
        grad_hidden_MxD, grad_hidden_RxD.astype(dtype), at, 0))

  # The chunks after the last real target are never visited: their rows' gradient stays 0.
  # Shaped like the table and the rows (zeros_like): under shard_map they vary as those do.
  start = (jnp.zeros_like(items_NxD, jnp.float32).T, jnp.zeros_like(weight_M[0]),
           jnp.zeros_like(hidden_MxD))
  grad_items_DxN, total, grad_hidden_MxD = jax.lax.fori_loop(
      0, _chunks_with_targets(weight_M, rows), add_chunk, start)
  grad_item_emb_VxD = jnp.pad(grad_items_DxN.T, ((1, 0), (0, 0))).astype(item_emb_VxD.dtype)
  return total, (grad_hidden_MxD, grad_item_emb_VxD)


def _chunked_backward(rows, residuals, grad_total):
  del rows
  grad_hidden_MxD, grad_item_emb_VxD = residuals
  return (grad_hidden_MxD * grad_total.astype(grad_hidden_MxD.dtype),
          grad_item_emb_VxD * grad_total, None, None)


_chunked_nll_sum.defvjp(_chunked_forward, _chunked_backward)


