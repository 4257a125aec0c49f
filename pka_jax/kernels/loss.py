"""The full-catalog cross-entropy as Pallas kernels that never write the logits (GPU, Triton).

XLA's best plan for `losses.chunked_cross_entropy` on a GPU writes the `rows × N` float32 logits
once and reads them in three memory-bound passes (max and sum, gradient, conversion): on an
H200 those passes took 0.37 of the loss's 0.64 ms at ML-1M shapes. Here each tile of logits
lives only in registers:

* forward, one program per block of rows: a running log-sum-exp and the target logit over
  blocks of items;
* gradient of the hidden states, one program per block of rows: `(softmax - onehot) E`;
* gradient of the item table, one program per block of items and part of the rows:
  `(softmax - onehot)ᵀ h`.

Rows with a target come first (a stable sort of the rows, undone by the gradient's scatter),
and every kernel skips the blocks of rows past them: a third of ML-1M's positions are
padding. The two gradient kernels recompute their tiles of logits (5 products of
`rows × N × D` against XLA's 3), so this is a trade of FLOPs for memory traffic that only a
GPU profile can judge (`experiments/kernels/benchmark.py --kernel=loss`,
`experiments/speed/benchmark.py --config.ce_impl=pallas`). Exact: the
same loss and gradients as `losses.full_cross_entropy` to float tolerance. Off a GPU the
kernels run in Pallas's interpreter, slowly, for checks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from pka_jax.kernels import sharded


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tile sizes (powers of two, at least 16: Triton's dot), Triton's launch settings, and the
  programs the item table's gradient aims at (an H100 has 132 multiprocessors)."""
  block_rows: int = 64
  block_items: int = 128
  num_warps: int = 4
  num_stages: int = 2
  min_programs: int = 512

  def __post_init__(self):
    for name in ('block_rows', 'block_items'):
      size = getattr(self, name)
      if size < 16 or size & (size - 1):
        raise ValueError(f'Tiling.{name} {size}: expected a power of two, at least 16')


def pallas_cross_entropy(
    hidden_BxTxD: jax.Array, item_emb_VxD: jax.Array, targets_BxT: jax.Array,
    tiling: Tiling = Tiling(), interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """`(sum, count)` of `losses.full_cross_entropy` without the logits in memory.

  `interpret` None runs Triton kernels on an NVIDIA GPU and Pallas's interpreter elsewhere
  (which jax 0.10 cannot run inside shard_map). Logits, softmax and the sums are float32;
  the products take the hidden states' dtype.
  """
  hidden_MxD = hidden_BxTxD.reshape(-1, hidden_BxTxD.shape[-1])
  targets_M = targets_BxT.reshape(-1)
  # Rows with a target first (in order): the blocks of rows past them hold none, and the
  # kernels skip them (a third of ML-1M's positions are padding).
  order_M = jnp.argsort(targets_M <= 0, stable=True)
  hidden_MxD, targets_M = hidden_MxD[order_M], targets_M[order_M]
  weight_M = (targets_M > 0).astype(jnp.float32)
  count_1 = jnp.sum(targets_M > 0, dtype=jnp.int32).reshape(1)
  args = (hidden_MxD, item_emb_VxD, targets_M, weight_M, count_1)
  if interpret is None:  # chosen for the platform the program is compiled for
    total = jax.lax.platform_dependent(
        *args, cuda=functools.partial(_nll_sum, tiling=tiling, interpret=False),
        default=functools.partial(_nll_sum, tiling=tiling, interpret=True))
  else:
    total = _nll_sum(*args, tiling, interpret)
  return total, jnp.sum(weight_M)


def _pad_to(x: jax.Array, rows: int, cols: int | None = None, value=0) -> jax.Array:
  widths = [(0, rows - x.shape[0])]
  if cols is not None:
    widths.append((0, cols - x.shape[1]))
  return jnp.pad(x, widths, constant_values=value)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class _Layout:
  """The padded problem the kernels see: rows `M`, items `N` and width `D`, the first two
  padded to whole tiles, `D` to a power of two (zero columns change no product). The item
  table's gradient splits the rows in `row_splits` parts, each a program per block of items,
  so that a small catalog still gives the GPU enough programs; XLA adds the parts."""
  rows: int
  items: int
  width: int
  row_splits: int
  tiling: Tiling
  interpret: bool

  @classmethod
  def of(cls, hidden_MxD, items_NxD, tiling, interpret):
    width = max(16, 1 << (hidden_MxD.shape[1] - 1).bit_length())
    rows = _round_up(hidden_MxD.shape[0], tiling.block_rows)
    items = _round_up(items_NxD.shape[0], tiling.block_items)
    row_blocks, item_blocks = rows // tiling.block_rows, items // tiling.block_items
    splits = max(1, min(row_blocks, tiling.min_programs // item_blocks))
    return cls(rows, items, width, splits, tiling, interpret)

  @property
  def row_blocks(self) -> int:
    return self.rows // self.tiling.block_rows

  @property
  def item_blocks(self) -> int:
    return self.items // self.tiling.block_items

  def call(self, kernel, grid, out_shape, in_specs, out_specs, **static):
    tiling = self.tiling
    return pl.pallas_call(
        functools.partial(kernel, **static), out_shape=out_shape, grid=grid,
        in_specs=in_specs, out_specs=out_specs, interpret=self.interpret,
        compiler_params=None if self.interpret else pallas_triton.CompilerParams(
            num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        name=kernel.__name__.strip('_'))

  def row_block(self, *trailing):
    return pl.BlockSpec((self.tiling.block_rows, *trailing),
                        lambda i: (i, *(0,) * len(trailing)))

  def whole(self, *shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _item_tile(items_ref, block, block_items):
  start = pl.multiple_of(block * block_items, block_items)
  return start, items_ref[pl.ds(start, block_items), :]


def _has_targets(count_ref, rows: int):
  """Whether this program's block of `rows` rows holds targets: the first `count` rows do."""
  return pl.program_id(0) * rows < count_ref[0]


def _log_sum_exp_kernel(hidden_ref, items_ref, classes_ref, count_ref, log_z_ref, target_ref,
                        *, num_items: int, block_items: int):
  """Per row of the block: log-sum-exp of its logits over the real items, and the target's
  logit (0 where the class is -1)."""
  hidden_RxD, classes_R = hidden_ref[...], classes_ref[...]
  rows = hidden_RxD.shape[0]

  def add_tile(block, carry):
    max_R, sum_R, target_R = carry
    start, items_KxD = _item_tile(items_ref, block, block_items)
    logits_RxK = jnp.dot(hidden_RxD, items_KxD.T, preferred_element_type=jnp.float32)
    item_RxK = start + jax.lax.broadcasted_iota(jnp.int32, logits_RxK.shape, 1)
    logits_RxK = jnp.where(item_RxK < num_items, logits_RxK, -jnp.inf)
    new_max_R = jnp.maximum(max_R, jnp.max(logits_RxK, axis=1))
    sum_R = sum_R * jnp.exp(max_R - new_max_R) + jnp.sum(
        jnp.exp(logits_RxK - new_max_R[:, None]), axis=1)
    target_R += jnp.sum(jnp.where(item_RxK == classes_R[:, None], logits_RxK, 0.0), axis=1)
    return new_max_R, sum_R, target_R

  @pl.when(_has_targets(count_ref, rows))
  def _():
    start = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    max_R, sum_R, target_R = jax.lax.fori_loop(
        0, pl.cdiv(num_items, block_items), add_tile, start)
    log_z_ref[...] = max_R + jnp.log(sum_R)
    target_ref[...] = target_R

  @pl.when(~_has_targets(count_ref, rows))
  def _():  # padding only: nothing reads these
    log_z_ref[...] = jnp.zeros(log_z_ref.shape, jnp.float32)
    target_ref[...] = jnp.zeros(target_ref.shape, jnp.float32)


def _logit_grads(logits, item, classes, log_z, scale):
  """d(scale · nll)/d(logits) = scale · (softmax - onehot), for one tile of either layout.
  Padding items (zero rows past the catalog) get a softmax term here: their products and
  their gradient rows are zero or dropped, so it reaches nothing."""
  return (jnp.exp(logits - log_z) - jnp.where(item == classes, 1.0, 0.0)) * scale


def _grad_hidden_kernel(hidden_ref, items_ref, classes_ref, log_z_ref, scale_ref, count_ref,
                        grad_ref, *, num_items: int, block_items: int):
  """`(softmax - onehot) · scale` of each tile of the rows' logits, times the items' tile."""
  hidden_RxD, classes_R = hidden_ref[...], classes_ref[...]
  log_z_R, scale_R = log_z_ref[...], scale_ref[...]

  def add_tile(block, grad_RxD):
    start, items_KxD = _item_tile(items_ref, block, block_items)
    logits_RxK = jnp.dot(hidden_RxD, items_KxD.T, preferred_element_type=jnp.float32)
    item_RxK = start + jax.lax.broadcasted_iota(jnp.int32, logits_RxK.shape, 1)
    grads_RxK = _logit_grads(logits_RxK, item_RxK, classes_R[:, None], log_z_R[:, None],
                             scale_R[:, None])
    return grad_RxD + jnp.dot(grads_RxK.astype(items_KxD.dtype), items_KxD,
                              preferred_element_type=jnp.float32)

  @pl.when(_has_targets(count_ref, hidden_RxD.shape[0]))
  def _():
    grad_ref[...] = jax.lax.fori_loop(
        0, pl.cdiv(num_items, block_items), add_tile,
        jnp.zeros(hidden_RxD.shape, jnp.float32)).astype(grad_ref.dtype)

  @pl.when(~_has_targets(count_ref, hidden_RxD.shape[0]))
  def _():  # padding only: no gradient
    grad_ref[...] = jnp.zeros(grad_ref.shape, grad_ref.dtype)


def _grad_items_kernel(items_ref, hidden_ref, classes_ref, log_z_ref, scale_ref, count_ref,
                       grad_ref, *, row_blocks: int, blocks_per_split: int, block_rows: int,
                       block_items: int):
  """`((softmax - onehot) · scale)ᵀ` times the rows, summed over this program's part of the
  blocks of rows that hold targets, for its tile of items."""
  items_KxD = items_ref[...]
  first_item = pl.program_id(0) * block_items
  first_block = pl.program_id(1) * blocks_per_split

  def add_rows(block, grad_KxD):
    start = pl.multiple_of(block * block_rows, block_rows)
    rows = pl.ds(start, block_rows)
    hidden_RxD = hidden_ref[rows, :]
    logits_KxR = jnp.dot(items_KxD, hidden_RxD.T, preferred_element_type=jnp.float32)
    item_KxR = first_item + jax.lax.broadcasted_iota(jnp.int32, logits_KxR.shape, 0)
    grads_KxR = _logit_grads(logits_KxR, item_KxR, classes_ref[rows][None, :],
                             log_z_ref[rows][None, :], scale_ref[rows][None, :])
    return grad_KxD + jnp.dot(grads_KxR.astype(hidden_RxD.dtype), hidden_RxD,
                              preferred_element_type=jnp.float32)

  last_block = jnp.minimum(jnp.minimum(first_block + blocks_per_split, row_blocks),
                           pl.cdiv(count_ref[0], block_rows))
  grad_ref[...] = jax.lax.fori_loop(first_block, last_block, add_rows,
                                    jnp.zeros(items_KxD.shape, jnp.float32))


def _forward_pass(layout: _Layout, hidden_MxD, items_NxD, classes_M, count_1, num_items):
  row_vector = layout.row_block()
  return layout.call(
      _log_sum_exp_kernel, (layout.row_blocks,),
      (sharded.varying_like(hidden_MxD, (layout.rows,), jnp.float32),) * 2,
      [layout.row_block(layout.width), layout.whole(layout.items, layout.width), row_vector,
       layout.whole(1)],
      (row_vector, row_vector), num_items=num_items,
      block_items=layout.tiling.block_items)(hidden_MxD, items_NxD, classes_M, count_1)


def _backward_pass(layout: _Layout, hidden_MxD, items_NxD, classes_M, log_z_M, scale_M,
                   count_1, num_items):
  tiling, width = layout.tiling, layout.width
  row_vector = layout.row_block()
  grad_hidden_MxD = layout.call(
      _grad_hidden_kernel, (layout.row_blocks,),
      sharded.varying_like(hidden_MxD, hidden_MxD.shape, hidden_MxD.dtype),
      [layout.row_block(width), layout.whole(layout.items, width), row_vector, row_vector,
       row_vector, layout.whole(1)],
      layout.row_block(width), num_items=num_items, block_items=tiling.block_items,
  )(hidden_MxD, items_NxD, classes_M, log_z_M, scale_M, count_1)
  row_vectors = layout.whole(layout.rows)
  splits = layout.row_splits
  grad_parts_SxNxD = layout.call(
      _grad_items_kernel, (layout.item_blocks, splits),
      sharded.varying_like(items_NxD, (splits, *items_NxD.shape), jnp.float32),
      [pl.BlockSpec((tiling.block_items, width), lambda i, s: (i, 0)),
       layout.whole(layout.rows, width), row_vectors, row_vectors, row_vectors,
       layout.whole(1)],
      pl.BlockSpec((None, tiling.block_items, width), lambda i, s: (s, i, 0)),
      row_blocks=layout.row_blocks, blocks_per_split=-(-layout.row_blocks // splits),
      block_rows=tiling.block_rows, block_items=tiling.block_items,
  )(items_NxD, hidden_MxD, classes_M, log_z_M, scale_M, count_1)
  return grad_hidden_MxD, jnp.sum(grad_parts_SxNxD, axis=0)


def _padded(hidden_MxD, item_emb_VxD, targets_M, tiling, interpret):
  """The layout, and the rows, items (the table without the padding id, in the rows' dtype)
  and classes (`target - 1`, -1 for none) padded to it."""
  items_NxD = item_emb_VxD[1:].astype(hidden_MxD.dtype)
  layout = _Layout.of(hidden_MxD, items_NxD, tiling, interpret)
  return (layout, _pad_to(hidden_MxD, layout.rows, layout.width),
          _pad_to(items_NxD, layout.items, layout.width),
          _pad_to(targets_M.astype(jnp.int32) - 1, layout.rows, value=-1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _nll_sum(hidden_MxD, item_emb_VxD, targets_M, weight_M, count_1, tiling, interpret):
  """The rows' summed loss; `count_1`: how many rows, the first ones, have targets."""
  return _nll_forward(hidden_MxD, item_emb_VxD, targets_M, weight_M, count_1, tiling,
                      interpret)[0]


def _nll_forward(hidden_MxD, item_emb_VxD, targets_M, weight_M, count_1, tiling, interpret):
  layout, hidden, items, classes = _padded(hidden_MxD, item_emb_VxD, targets_M, tiling,
                                           interpret)
  log_z_M, target_logit_M = _forward_pass(layout, hidden, items, classes, count_1,
                                          item_emb_VxD.shape[0] - 1)
  rows = hidden_MxD.shape[0]
  # Rows without a target add nothing (where, not a product: nothing of theirs is read).
  total = jnp.sum(jnp.where(weight_M > 0, log_z_M[:rows] - target_logit_M[:rows], 0.0))
  # The padded inputs, not the originals: the backward pass pads nothing again.
  return total, (hidden, items, classes, weight_M, count_1, log_z_M, item_emb_VxD)


def _nll_backward(tiling, interpret, residuals, grad_total):
  hidden, items, classes, weight_M, count_1, log_z_M, item_emb_VxD = residuals
  layout = _Layout.of(hidden, items, tiling, interpret)  # already padded to it
  scale_M = _pad_to(grad_total * weight_M, layout.rows)
  num_items, width = item_emb_VxD.shape[0] - 1, item_emb_VxD.shape[1]
  grad_hidden, grad_items = _backward_pass(layout, hidden, items, classes, log_z_M, scale_M,
                                           count_1, num_items)
  grad_item_emb_VxD = jnp.pad(grad_items[:num_items, :width], ((1, 0), (0, 0)))
  return (grad_hidden[:weight_M.shape[0], :width],
          grad_item_emb_VxD.astype(item_emb_VxD.dtype), None, None, None)


_nll_sum.defvjp(_nll_forward, _nll_backward)
