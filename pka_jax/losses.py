"""Training losses over the tied item table. Each returns `(sum, count)` over real targets."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def full_cross_entropy(
    hidden_BxTxD: jax.Array, item_emb_VxD: jax.Array, targets_BxT: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy over the whole catalog `1..N`; the padding id is not a class."""
  logits_BxTxN = hidden_BxTxD @ item_emb_VxD[1:].T
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
    hidden_BxTxD: jax.Array, item_emb_VxD: jax.Array, targets_BxT: jax.Array, block_size: int
) -> tuple[jax.Array, jax.Array]:
  """`full_cross_entropy` without the `B×T×N` logits: items are scored `block_size` at a time.

  Exact. The forward pass keeps a running log-sum-exp per position; the backward pass
  recomputes each block's softmax, so memory holds one `B·T × block_size` block at a time.
  """
  d = hidden_BxTxD.shape[-1]
  hidden_MxD = hidden_BxTxD.reshape(-1, d)
  targets_M = targets_BxT.reshape(-1)
  weight_M = (targets_M > 0).astype(hidden_MxD.dtype)
  total = _blockwise_nll_sum(hidden_MxD, item_emb_VxD[1:], targets_M, weight_M, block_size)
  return total, jnp.sum(weight_M)


def _item_blocks(items_NxD: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
  """Items as `num_blocks × block_size × D` (zero-padded) and a mask of the real ones."""
  n, d = items_NxD.shape
  num_blocks = -(-n // block_size)
  padded = jnp.pad(items_NxD, ((0, num_blocks * block_size - n), (0, 0)))
  real = jnp.arange(num_blocks * block_size) < n
  return padded.reshape(num_blocks, block_size, d), real.reshape(num_blocks, block_size)


def _block_logits(hidden_MxD, block_KxD, real_K):
  return jnp.where(real_K[None, :], hidden_MxD @ block_KxD.T, -jnp.inf)


def _log_sum_exp_over_blocks(hidden_MxD, items_NxD, block_size):
  blocks, real = _item_blocks(items_NxD, block_size)

  def add_block(carry, block):
    max_M, sum_M = carry
    logits_MxK = _block_logits(hidden_MxD, *block)
    new_max_M = jnp.maximum(max_M, logits_MxK.max(axis=1))
    sum_M = sum_M * jnp.exp(max_M - new_max_M) + jnp.exp(
        logits_MxK - new_max_M[:, None]).sum(axis=1)
    return (new_max_M, sum_M), None

  start = (jnp.full(hidden_MxD.shape[0], -jnp.inf, hidden_MxD.dtype),
           jnp.zeros(hidden_MxD.shape[0], hidden_MxD.dtype))
  (max_M, sum_M), _ = jax.lax.scan(add_block, start, (blocks, real))
  return max_M + jnp.log(sum_M)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise_nll_sum(hidden_MxD, items_NxD, targets_M, weight_M, block_size):
  return _blockwise_forward(hidden_MxD, items_NxD, targets_M, weight_M, block_size)[0]


def _blockwise_forward(hidden_MxD, items_NxD, targets_M, weight_M, block_size):
  log_z_M = _log_sum_exp_over_blocks(hidden_MxD, items_NxD, block_size)
  target_emb_MxD = items_NxD[jnp.maximum(targets_M - 1, 0)]
  target_logit_M = jnp.einsum('md,md->m', hidden_MxD, target_emb_MxD)
  total = jnp.sum((log_z_M - target_logit_M) * weight_M)
  return total, (hidden_MxD, items_NxD, targets_M, weight_M, log_z_M)


def _blockwise_backward(block_size, residuals, grad_total):
  hidden_MxD, items_NxD, targets_M, weight_M, log_z_M = residuals
  blocks, real = _item_blocks(items_NxD, block_size)
  scale_M = grad_total * weight_M

  def block_grads(grad_hidden_MxD, block):
    block_KxD, real_K = block
    # d(loss)/d(logits) = softmax - onehot; the softmax part here, the onehot part below.
    probs_MxK = jnp.exp(_block_logits(hidden_MxD, block_KxD, real_K) - log_z_M[:, None])
    probs_MxK = probs_MxK * scale_M[:, None]
    return grad_hidden_MxD + probs_MxK @ block_KxD, probs_MxK.T @ hidden_MxD

  grad_hidden_MxD, grad_blocks = jax.lax.scan(
      block_grads, jnp.zeros_like(hidden_MxD), (blocks, real))
  n = items_NxD.shape[0]
  grad_items_NxD = grad_blocks.reshape(-1, items_NxD.shape[1])[:n]
  target_M = jnp.maximum(targets_M - 1, 0)
  grad_hidden_MxD = grad_hidden_MxD - scale_M[:, None] * items_NxD[target_M]
  grad_items_NxD = grad_items_NxD.at[target_M].add(-scale_M[:, None] * hidden_MxD)
  return grad_hidden_MxD, grad_items_NxD, None, None


_blockwise_nll_sum.defvjp(_blockwise_forward, _blockwise_backward)
