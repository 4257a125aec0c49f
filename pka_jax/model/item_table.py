"""The item table walked in blocks: the arithmetic the loss, the ranking and serving share.

The table holds the padding row 0, items `1..N`, then unused rows up to a multiple of the
devices its rows are split over (`table_rows`). Scoring the whole catalog for many rows at once
would hold `rows × N` logits; the loss and the ranking instead score chunks of rows
(`chunk_rows_for`) against blocks of items (`even_blocks`, `item_block`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Logits of one chunk of rows: cache-sized on CPU, large enough to fill an accelerator. Real
# targets come first and chunks without one are skipped, so smaller chunks waste less on the
# last, partly real one; at ML-1M shapes 8 MiB (512 rows) and 16 ran the step equally fast.
CHUNK_LOGIT_BYTES = {'cpu': 8 << 20}
ACCELERATOR_CHUNK_LOGIT_BYTES = 1 << 30


def table_rows(num_items: int, mesh_model: int) -> int:
  """Rows of the item table: padding id 0, items 1..N, then unused rows up to a multiple of
  `mesh_model` (every shard the same size); unused rows never score nor train."""
  return -(-(num_items + 1) // mesh_model) * mesh_model


def chunk_rows_for(num_items: int, num_rows: int, backend: str | None = None) -> int:
  """Rows per chunk of logits against `num_items` items: a power of two whose float32 logits
  come near the backend's budget, at most all rows; at least 128, so that each chunk's
  products with the item table stay compute-bound."""
  budget = CHUNK_LOGIT_BYTES.get(backend or jax.default_backend(),
                                 ACCELERATOR_CHUNK_LOGIT_BYTES)
  rows = 1 << max(7, int(math.log2(max(budget // (4 * max(num_items, 1)), 1))))
  return min(rows, num_rows)


def even_blocks(rows: int, block_size: int) -> int:
  """Rows a block of a table of `rows` rows walked in blocks of at most `block_size`: the
  fewest blocks, all of one size, so that the last (moved back to end with the table)
  overlaps the one before by fewer rows than there are blocks (12,102 rows in blocks of at
  most 8,192: two of 6,051, not 8,192 and 8,192 with 4,282 scored twice)."""
  blocks = -(-rows // block_size)
  return -(-rows // blocks)


def item_block(table_RxD, index, size: int, first, num_items: int, dtype):
  """Block `index` of a table walked in blocks of `size` rows (`even_blocks`), whose first row
  is item `first`: `(start, rows_KxD, items_K, scores_K)`, the rows in `dtype`. The last
  block ends with the table; its rows that the block before holds do not score in it, nor
  rows that are no item (`1..num_items`)."""
  start = jnp.minimum(index * size, table_RxD.shape[0] - size)
  row_K = start + jnp.arange(size)
  item_K = first + row_K
  scores_K = (row_K >= index * size) & (item_K >= 1) & (item_K <= num_items)
  block_KxD = jax.lax.dynamic_slice_in_dim(table_RxD, start, size).astype(dtype)
  return start, block_KxD, item_K, scores_K
