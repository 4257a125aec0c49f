"""A step's batch in microbatches: the same gradient, dropout masks included, for activations
that stay in a CPU's cache, and, sorted by history length, for fewer FLOPs where lengths are
spread (each microbatch cut to the window its longest row needs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pka_jax.data.sequences import window_width


# Positions per microbatch on CPU: a block's activations then stay in cache. Measured at the
# ML-1M PKA shape on 2 cores, 1,024 to 4,096 positions all ran the step ~30% faster than the
# whole batch of 32,768 at once (experiments/speed/benchmark.py).
CPU_MICROBATCH_POSITIONS = 2048


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
