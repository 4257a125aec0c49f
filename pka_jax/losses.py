"""Training losses over the tied item table. Each returns `(sum, count)` over real targets.

Three exact implementations of the full-catalog cross-entropy, one definition:

* `full_cross_entropy`: all `B·T × N` logits at once, differentiated by JAX (the reference);
* `chunked_cross_entropy` (the default): rows in chunks whose logits fit in cache, the
  gradients computed in the same pass as the loss, so no logits are ever stored or recomputed;
* `blockwise_cross_entropy`: items in blocks, for catalogs whose logits for even a few rows
  would not fit (memory of one block, about 2x the FLOPs).

These two, and `sharded_cross_entropy` (the table split over devices), sort the real targets
first and skip the chunks of rows that hold none: a batch costs the catalog products of its
real positions, however much of its windows is padding.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pka_jax import sharding

# Logits of one chunk of rows: cache-sized on CPU, large enough to fill an accelerator. Real
# targets come first and chunks without one are skipped, so smaller chunks waste less on the
# last, partly real one; at ML-1M shapes 8 MiB (512 rows) and 16 ran the step equally fast.
CHUNK_LOGIT_BYTES = {'cpu': 8 << 20}
ACCELERATOR_CHUNK_LOGIT_BYTES = 1 << 30


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

  Exact. The forward pass keeps a running log-sum-exp per position; the backward pass
  recomputes each block's softmax, so memory holds one `rows × block_size` block at a time.
  Rows go in chunks of `chunk_rows` (0: `chunk_rows_for` the block), real targets first; a
  chunk without one is skipped, so padding costs no catalog products.
  """
  rows = chunk_rows or chunk_rows_for(block_size, targets_BxT.size)
  hidden_MxD, targets_M, weight_M = _real_rows_first(hidden_BxTxD, targets_BxT, rows,
                                                     hidden_BxTxD.dtype)
  total = _blockwise_nll_sum(hidden_MxD, item_emb_VxD[1:], targets_M, weight_M, block_size,
                             rows)
  return total, jnp.sum(weight_M)


def _item_blocks(items_NxD: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
  """Items as `num_blocks × block_size × D` (zero-padded) and a mask of the real ones."""
  n, d = items_NxD.shape
  num_blocks = -(-n // block_size)
  padded = jnp.pad(items_NxD, ((0, num_blocks * block_size - n), (0, 0)))
  real = jnp.arange(num_blocks * block_size) < n
  return padded.reshape(num_blocks, block_size, d), real.reshape(num_blocks, block_size)


def _block_logits(hidden_MxD, block_KxD, real_K):
  logits_MxK = jnp.dot(hidden_MxD, block_KxD.T, preferred_element_type=jnp.float32)
  return jnp.where(real_K[None, :], logits_MxK, -jnp.inf)


def _log_sum_exp_over_blocks(hidden_MxD, items_NxD, block_size):
  blocks, real = _item_blocks(items_NxD, block_size)

  def add_block(carry, block):
    max_M, sum_M = carry
    logits_MxK = _block_logits(hidden_MxD, *block)
    new_max_M = jnp.maximum(max_M, logits_MxK.max(axis=1))
    sum_M = sum_M * jnp.exp(max_M - new_max_M) + jnp.exp(
        logits_MxK - new_max_M[:, None]).sum(axis=1)
    return (new_max_M, sum_M), None

  # Shaped like the rows (full_like): under shard_map the carry varies per device as they do.
  start = (jnp.full_like(hidden_MxD[:, 0], -jnp.inf), jnp.zeros_like(hidden_MxD[:, 0]))
  (max_M, sum_M), _ = jax.lax.scan(add_block, start, (blocks, real))
  return max_M + jnp.log(sum_M)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise_nll_sum(hidden_MxD, items_NxD, targets_M, weight_M, block_size, rows):
  return _blockwise_forward(hidden_MxD, items_NxD, targets_M, weight_M, block_size, rows)[0]


def _blockwise_forward(hidden_MxD, items_NxD, targets_M, weight_M, block_size, rows):
  def chunk_log_z(chunk):
    return _log_sum_exp_over_blocks(chunk[0], items_NxD, block_size)

  chunks = _chunks(rows, hidden_MxD, targets_M, weight_M)
  _, log_z_CxR = jax.lax.scan(lambda _, c: (None, _unless_empty(chunk_log_z, c)), None, chunks)
  log_z_M = log_z_CxR.reshape(-1)
  target_emb_MxD = items_NxD[jnp.maximum(targets_M - 1, 0)]
  target_logit_M = jnp.einsum('md,md->m', hidden_MxD, target_emb_MxD)
  # Rows without a target add nothing (where, not a product: nothing of theirs is read).
  total = jnp.sum(jnp.where(weight_M > 0, log_z_M - target_logit_M, 0.0))
  return total, (hidden_MxD, items_NxD, targets_M, weight_M, log_z_M)


def _blockwise_backward(block_size, rows, residuals, grad_total):
  hidden_MxD, items_NxD, targets_M, weight_M, log_z_M = residuals
  blocks, real = _item_blocks(items_NxD, block_size)
  scale_M = grad_total * weight_M

  def chunk_grads(chunk):
    hidden_RxD, _, _, log_z_R, scale_R = chunk

    def block_grads(grad_hidden_RxD, block):
      block_KxD, real_K = block
      # d(loss)/d(logits) = softmax - onehot; the softmax part here, the onehot part below.
      probs_RxK = jnp.exp(_block_logits(hidden_RxD, block_KxD, real_K) - log_z_R[:, None])
      probs_RxK = probs_RxK * scale_R[:, None]
      return grad_hidden_RxD + probs_RxK @ block_KxD, probs_RxK.T @ hidden_RxD

    grad_hidden_RxD, grad_blocks = jax.lax.scan(
        block_grads, jnp.zeros_like(hidden_RxD), (blocks, real))
    return grad_hidden_RxD, grad_blocks

  def add_chunk(grad_blocks, chunk):
    grad_hidden_RxD, chunk_blocks = _unless_empty(chunk_grads, chunk)
    return grad_blocks + chunk_blocks, grad_hidden_RxD

  chunks = _chunks(rows, hidden_MxD, targets_M, weight_M, log_z_M, scale_M)
  grad_blocks, grad_hidden_CxRxD = jax.lax.scan(
      add_chunk, jnp.zeros_like(blocks, hidden_MxD.dtype), chunks)
  grad_hidden_MxD = grad_hidden_CxRxD.reshape(hidden_MxD.shape)
  n = items_NxD.shape[0]
  grad_items_NxD = grad_blocks.reshape(-1, items_NxD.shape[1])[:n]
  target_M = jnp.maximum(targets_M - 1, 0)
  grad_hidden_MxD = grad_hidden_MxD - scale_M[:, None] * items_NxD[target_M]
  grad_items_NxD = grad_items_NxD.at[target_M].add(
      jnp.where(weight_M[:, None] > 0, -scale_M[:, None] * hidden_MxD, 0.0))
  return grad_hidden_MxD, grad_items_NxD, None, None


_blockwise_nll_sum.defvjp(_blockwise_forward, _blockwise_backward)


def chunk_rows_for(num_items: int, num_rows: int, backend: str | None = None) -> int:
  """Rows per chunk of `chunked_cross_entropy`: a power of two whose float32 logits come near
  the backend's budget, at most all rows; at least 128, so that each chunk's products with the
  item table stay compute-bound."""
  budget = CHUNK_LOGIT_BYTES.get(backend or jax.default_backend(),
                                 ACCELERATOR_CHUNK_LOGIT_BYTES)
  rows = 1 << max(7, int(math.log2(max(budget // (4 * max(num_items, 1)), 1))))
  return min(rows, num_rows)


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


def _real_rows_first(hidden_BxTxD: jax.Array, targets_BxT: jax.Array, rows: int,
                     weight_dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Positions as rows `(hidden_MxD, targets_M, weight_M)`, real targets first (a stable
  sort) and padded to whole chunks of `rows`: the chunks after the real rows hold none, and
  `_unless_empty` skips them, so padding costs no catalog products. Rows that fit one chunk
  (an accelerator's whole batch) keep their order: there is no chunk to skip, and the sort
  and gather took ~60 µs of a 2.5 ms step on an H200 (the gather's gradient is a scatter)."""
  hidden_MxD = hidden_BxTxD.reshape(-1, hidden_BxTxD.shape[-1])
  targets_M = targets_BxT.reshape(-1)
  if targets_M.shape[0] > rows:
    order_M = jnp.argsort(targets_M <= 0, stable=True)
    hidden_MxD, targets_M = hidden_MxD[order_M], targets_M[order_M]
  pad = -targets_M.shape[0] % rows
  hidden_MxD, targets_M = jnp.pad(hidden_MxD, ((0, pad), (0, 0))), jnp.pad(targets_M, (0, pad))
  return hidden_MxD, targets_M, (targets_M > 0).astype(weight_dtype)


def _unless_empty(fn, chunk):
  """`fn(chunk)`, or its zeros without computing it when the chunk has no real target."""
  zeros = lambda chunk: jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, chunk))
  return jax.lax.cond(jnp.any(chunk[2] > 0), fn, zeros, chunk)


def _chunks(rows: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
  return tuple(a.reshape(a.shape[0] // rows, rows, *a.shape[1:]) for a in arrays)


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

  def nll(chunk):
    hidden_RxD, targets_R, weight_R = chunk
    _, _, log_z_R, target_logit_R = _chunk_softmax(hidden_RxD, items_NxD, targets_R)
    return jnp.sum((log_z_R - target_logit_R) * weight_R)

  def chunk_nll(_, chunk):
    return None, _unless_empty(nll, chunk)

  _, nll_C = jax.lax.scan(chunk_nll, None, _chunks(rows, hidden_MxD, targets_M, weight_M))
  return jnp.sum(nll_C)


def _chunked_forward(hidden_MxD, item_emb_VxD, targets_M, weight_M, rows):
  dtype = hidden_MxD.dtype
  items_NxD = item_emb_VxD[1:].astype(dtype)

  def chunk_grads(chunk):
    hidden_RxD, targets_R, weight_R = chunk
    exp_RxN, sum_Rx1, log_z_R, target_logit_R = _chunk_softmax(hidden_RxD, items_NxD,
                                                               targets_R)
    onehot_RxN = jnp.arange(items_NxD.shape[0])[None, :] == (targets_R - 1)[:, None]
    nll = jnp.sum((log_z_R - target_logit_R) * weight_R)
    # d nll / d logits = (softmax - onehot) * weight
    grad_RxN = (exp_RxN * (weight_R[:, None] / sum_Rx1)
                - jnp.where(onehot_RxN, weight_R[:, None], 0.0)).astype(dtype)
    grad_hidden_RxD = jnp.dot(grad_RxN, items_NxD, preferred_element_type=jnp.float32)
    # hᵀ g, not gᵀ h: the contraction runs over the chunk's rows without transposing g.
    grad_items_DxN = jnp.einsum('rd,rn->dn', hidden_RxD, grad_RxN,
                                preferred_element_type=jnp.float32)
    return grad_items_DxN, nll, grad_hidden_RxD.astype(dtype)

  def add_chunk(grad_items_DxN, chunk):
    grads_DxN, nll, grad_hidden_RxD = _unless_empty(chunk_grads, chunk)
    return grad_items_DxN + grads_DxN, (nll, grad_hidden_RxD)

  chunks = _chunks(rows, hidden_MxD, targets_M, weight_M)
  # The first chunk seeds the running sum: under shard_map it carries the right sharding type.
  first_DxN, first_nll, first_hidden_RxD = chunk_grads(jax.tree.map(lambda c: c[0], chunks))
  grad_items_DxN, (nll_C, grad_hidden_CxRxD) = jax.lax.scan(
      add_chunk, first_DxN, jax.tree.map(lambda c: c[1:], chunks))
  grad_hidden_MxD = jnp.concatenate([first_hidden_RxD[None], grad_hidden_CxRxD]).reshape(
      hidden_MxD.shape)
  grad_item_emb_VxD = jnp.pad(grad_items_DxN.T, ((1, 0), (0, 0))).astype(item_emb_VxD.dtype)
  return first_nll + jnp.sum(nll_C), (grad_hidden_MxD, grad_item_emb_VxD)


def _chunked_backward(rows, residuals, grad_total):
  del rows
  grad_hidden_MxD, grad_item_emb_VxD = residuals
  return (grad_hidden_MxD * grad_total.astype(grad_hidden_MxD.dtype),
          grad_item_emb_VxD * grad_total, None, None)


_chunked_nll_sum.defvjp(_chunked_forward, _chunked_backward)


def sharded_cross_entropy(
    hidden_BxTxD: jax.Array, table_RxD: jax.Array, targets_BxT: jax.Array, *,
    num_items: int, block_size: int, chunk_rows: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """`full_cross_entropy` inside shard_map over ('data', 'model'), the item table's rows split
  over 'model' (sharding.py).

  Each shard scores its rows `[first, first + R)` of the table `block_size` at a time; the
  shards' log-sum-exps meet in a `pmax` and a `psum` of one number per position, the target
  logit in a `psum` from the shard that holds it. The backward pass recomputes each block's
  softmax with the global log-sum-exp: the table's gradient stays on its shard, the hidden
  states' gradient is summed over 'model'. Rows outside `1..num_items` never score. Positions
  go in chunks of `chunk_rows` (0: `chunk_rows_for` the block), real targets first, and a
  chunk without one is skipped; every 'model' shard holds the same positions, so they skip
  alike and the collectives, outside the chunk loops, line up.
  """
  rows = chunk_rows or chunk_rows_for(block_size, targets_BxT.size)
  hidden_MxD, targets_M, weight_M = _real_rows_first(hidden_BxTxD, targets_BxT, rows)
  total = _sharded_nll_sum(hidden_MxD, table_RxD, targets_M, weight_M, block_size, num_items,
                           rows)
  return total, jnp.sum(weight_M)


def _shard_blocks(table_RxD, block_size, num_items):
  """This shard's rows in blocks, with a mask of the rows that are items (1..num_items)."""
  rows = table_RxD.shape[0]
  item_R = sharding.shard_range(rows) + jnp.arange(rows)
  blocks, real = _item_blocks(table_RxD, block_size)
  in_catalog = jnp.pad((item_R >= 1) & (item_R <= num_items), (0, real.size - rows))
  return blocks, real & in_catalog.reshape(real.shape)


def _held_targets(table_RxD, targets_M):
  """Each target's row on this shard, and whether this shard holds it."""
  rows = table_RxD.shape[0]
  row_M = targets_M - sharding.shard_range(rows)
  held_M = (targets_M > 0) & (row_M >= 0) & (row_M < rows)
  return jnp.clip(row_M, 0, rows - 1), held_M


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _sharded_nll_sum(hidden_MxD, table_RxD, targets_M, weight_M, block_size, num_items, rows):
  return _sharded_forward(hidden_MxD, table_RxD, targets_M, weight_M, block_size, num_items,
                          rows)[0]


def _shard_max_sum(hidden_RxD, blocks, real):
  """Per row: the max of this shard's logits and the sum of their exponentials below it."""

  def block_max_sum(block):
    logits_RxK = _block_logits(hidden_RxD, *block)
    max_R = logits_RxK.max(axis=1)
    shift_R = jnp.where(jnp.isfinite(max_R), max_R, 0.0)  # a block of unused rows only
    return max_R, jnp.exp(logits_RxK - shift_R[:, None]).sum(axis=1)

  def add_block(carry, block):
    max_R, sum_R = carry
    block_max_R, block_sum_R = block_max_sum(block)
    new_max_R = jnp.maximum(max_R, block_max_R)
    shift_R = jnp.where(jnp.isfinite(new_max_R), new_max_R, 0.0)
    rescale = lambda m: jnp.exp(jnp.where(jnp.isfinite(m), m, -jnp.inf) - shift_R)
    return (new_max_R, sum_R * rescale(max_R) + block_sum_R * rescale(block_max_R)), None

  # The first block seeds the carry: under shard_map it has the per-shard type the scan needs.
  start = block_max_sum((blocks[0], real[0]))
  (max_R, sum_R), _ = jax.lax.scan(add_block, start, (blocks[1:], real[1:]))
  return max_R, sum_R


def _sharded_forward(hidden_MxD, table_RxD, targets_M, weight_M, block_size, num_items, rows):
  blocks, real = _shard_blocks(table_RxD.astype(hidden_MxD.dtype), block_size, num_items)
  chunk_max_sum = lambda chunk: _shard_max_sum(chunk[0], blocks, real)
  # A skipped chunk gets max 0 and sum 0: its log-sum-exp is -inf, and its rows no weight.
  _, (max_CxR, sum_CxR) = jax.lax.scan(
      lambda _, chunk: (None, _unless_empty(chunk_max_sum, chunk)), None,
      _chunks(rows, hidden_MxD, targets_M, weight_M))
  max_M, sum_M = max_CxR.reshape(-1), sum_CxR.reshape(-1)
  global_max_M = jax.lax.pmax(max_M, sharding.MODEL)
  log_z_M = global_max_M + jnp.log(
      jax.lax.psum(sum_M * jnp.exp(max_M - global_max_M), sharding.MODEL))
  row_M, held_M = _held_targets(table_RxD, targets_M)
  target_logit_M = jax.lax.psum(jnp.where(held_M, jnp.einsum(
      'md,md->m', hidden_MxD, table_RxD[row_M].astype(hidden_MxD.dtype),
      preferred_element_type=jnp.float32), 0.0), sharding.MODEL)
  total = jnp.sum(jnp.where(weight_M > 0, log_z_M - target_logit_M, 0.0))
  return total, (hidden_MxD, table_RxD, targets_M, weight_M, log_z_M)


def _sharded_backward(block_size, num_items, rows, residuals, grad_total):
  hidden_MxD, table_RxD, targets_M, weight_M, log_z_M = residuals
  dtype = hidden_MxD.dtype
  blocks, real = _shard_blocks(table_RxD.astype(dtype), block_size, num_items)
  scale_M = grad_total * weight_M

  def chunk_grads(chunk):
    hidden_RxD, _, _, log_z_R, scale_R = chunk

    def block_grads(block):
      block_KxD, real_K = block
      probs_RxK = jnp.exp(_block_logits(hidden_RxD, block_KxD, real_K) - log_z_R[:, None])
      probs_RxK = (probs_RxK * scale_R[:, None]).astype(dtype)
      return (jnp.dot(probs_RxK, block_KxD, preferred_element_type=jnp.float32),
              jnp.dot(probs_RxK.T, hidden_RxD, preferred_element_type=jnp.float32))

    def add_block(grad_hidden_RxD, block):
      grad_hidden, grad_block = block_grads(block)
      return grad_hidden_RxD + grad_hidden, grad_block

    first_hidden_RxD, first_block_KxD = block_grads((blocks[0], real[0]))
    grad_hidden_RxD, grad_blocks = jax.lax.scan(add_block, first_hidden_RxD,
                                                (blocks[1:], real[1:]))
    return grad_hidden_RxD, jnp.concatenate([first_block_KxD[None], grad_blocks])

  def add_chunk(grad_blocks, chunk):
    grad_hidden_RxD, chunk_blocks = _unless_empty(chunk_grads, chunk)
    return grad_blocks + chunk_blocks, grad_hidden_RxD

  chunks = _chunks(rows, hidden_MxD, targets_M, weight_M, log_z_M, scale_M)
  # The first chunk (real targets come first) seeds the table's gradient, with its type.
  first_hidden_RxD, first_blocks = chunk_grads(jax.tree.map(lambda c: c[0], chunks))
  grad_blocks, grad_hidden_CxRxD = jax.lax.scan(
      add_chunk, first_blocks, jax.tree.map(lambda c: c[1:], chunks))
  grad_hidden_MxD = jnp.concatenate([first_hidden_RxD[None], grad_hidden_CxRxD]).reshape(
      hidden_MxD.shape)
  table_rows = table_RxD.shape[0]
  grad_table_RxD = grad_blocks.reshape(-1, table_RxD.shape[1])[:table_rows]
  row_M, held_M = _held_targets(table_RxD, targets_M)
  target_scale_M = jnp.where(held_M, scale_M, 0.0)
  grad_hidden_MxD = grad_hidden_MxD - target_scale_M[:, None] * table_RxD[row_M]
  grad_table_RxD = grad_table_RxD.at[row_M].add(jnp.where(
      held_M[:, None], -target_scale_M[:, None] * hidden_MxD.astype(jnp.float32), 0.0))
  grad_hidden_MxD = jax.lax.psum(grad_hidden_MxD, sharding.MODEL)
  return grad_hidden_MxD.astype(dtype), grad_table_RxD.astype(table_RxD.dtype), None, None


_sharded_nll_sum.defvjp(_sharded_forward, _sharded_backward)
