"""Model FLOPs of the encoder, its loss and the successive evaluation, counted analytically.

Matrix products only (2 FLOPs a multiply-add), the convention behind MFU: layer norms,
softmax, dropout and the optimiser are left out. Training counts the backward pass as twice
the forward. A PKA kernel is counted in the cheaper of its two exact forms (attention.py):
`2·T²·d` applied to the inputs, `2·H·Q·T²` applied to the logits of `Q` query rows.
`MatmulProbe` measures the peak an MFU divides by.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from pka_jax.model.encoder import ModelConfig


def _kernel_flops(config: ModelConfig, num_queries: int, size: int) -> int:
  """Per sequence and block: the K- and V-side kernels (the Q side is always on the inputs)."""
  d, heads = config.hidden_units, config.num_heads
  total = 0
  for side in ('k', 'v'):
    if config.kernel_kind(side) != 'none':
      total += min(2 * size * size * d, 2 * heads * num_queries * size * size)
  if config.kernel_kind('q') != 'none':
    total += 2 * num_queries * size * d
  return total


def block_flops(config: ModelConfig, num_queries: int | None = None,
                size: int | None = None) -> int:
  """Forward FLOPs of one block on one window of `size` positions (maxlen by default) whose
  last `num_queries` are queried (all by default; 1 for the newest position alone)."""
  size, d = size or config.maxlen, config.hidden_units
  queries = size if num_queries is None else num_queries
  projections = 2 * 2 * size * d * d + 4 * 2 * queries * d * d  # K, V on all; Q, O, FFN
  attention = 2 * 2 * queries * size * d  # Q Kᵀ and A V over all heads
  cope = 0
  if config.position_mode == 'contextual':  # the query's head_dim² layer, then the table
    cope = 2 * queries * d * (d // config.num_heads) + 2 * queries * size * d
  return projections + attention + _kernel_flops(config, queries, size) + cope


def loss_flops(config: ModelConfig, loss: str = 'ce', positions: int | None = None) -> int:
  """Forward FLOPs of the training loss over `positions` targets (a whole window's by
  default; the chunked loss skips chunks of padding, so a batch costs its real targets)."""
  classes = config.num_items if loss == 'ce' else 2  # bce: the target and one negative
  return 2 * (config.maxlen if positions is None else positions) * config.hidden_units * classes


def train_step_flops(config: ModelConfig, batch_size: int, loss: str = 'ce',
                     real_targets: int | None = None, width: int | None = None) -> int:
  """Model FLOPs of one training step: forward and backward over the batch's windows of
  `width` positions (maxlen by default; trimmed batches are narrower), the loss over
  `real_targets` positions (every position of every window by default)."""
  width = width or config.maxlen
  if real_targets is None:
    real_targets = batch_size * width
  forward = (batch_size * config.num_blocks * block_flops(config, size=width)
             + loss_flops(config, loss, real_targets))
  return 3 * forward


def eval_pair_flops(config: ModelConfig, width: int | None = None) -> int:
  """Forward FLOPs of one successive-evaluation step: the encoder over a context window of
  `width` positions (maxlen by default; evaluation trims it), the last block querying only
  the newest position, then every item scored."""
  blocks = 0
  if config.num_blocks:
    blocks = ((config.num_blocks - 1) * block_flops(config, size=width)
              + block_flops(config, num_queries=1, size=width))
  return blocks + 2 * config.hidden_units * config.num_items


class MatmulProbe:
  """The default device's dense-matmul FLOP/s: the fastest of a few `size × size` products.

  Called again beside each timed step, it gives the peak of that moment: a shared machine's
  speed drifts within a run (this project's 2-core VM by 10-20% over minutes), and an MFU
  against the peak probed beside the step follows the code, not the neighbours. `size` 0:
  2,048 on a CPU, 8,192 on an accelerator."""

  def __init__(self, dtype, size: int = 0):
    self.size = size = size or (2048 if jax.default_backend() == 'cpu' else 8192)
    rng = np.random.default_rng(0)
    self.a, self.b = (jnp.asarray(rng.standard_normal((size, size)), dtype) for _ in range(2))
    self.product = jax.jit(jnp.matmul)
    self.product(self.a, self.b).block_until_ready()
    self.flops = 2 * size**3

  def __call__(self, repeats: int = 10) -> float:
    best = float('inf')
    for _ in range(repeats):
      start = time.perf_counter()
      self.product(self.a, self.b).block_until_ready()
      best = min(best, time.perf_counter() - start)
    return self.flops / best
