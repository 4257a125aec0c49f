"""Training losses over the tied item table. Each returns `(sum, count)` over real targets."""

from __future__ import annotations

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
