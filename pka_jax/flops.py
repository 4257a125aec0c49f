"""Model FLOPs of the encoder, its loss and the successive evaluation, counted analytically.

Matrix products only (2 FLOPs a multiply-add), the convention behind MFU: layer norms,
softmax, dropout and the optimiser are left out. Training counts the backward pass as twice
the forward. A PKA kernel is counted in the cheaper of its two exact forms (attention.py):
`2·T²·d` applied to the inputs, `2·H·Q·T²` applied to the logits of `Q` query rows.
"""

from __future__ import annotations

from pka_jax.models import ModelConfig


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
