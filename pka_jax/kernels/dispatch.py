"""The one place that picks an implementation for each op that has more than one.

* attention (`config.attention_impl`): the plain masked softmax, `jax.nn.dot_product_attention`
  (XLA's or cuDNN's fused kernel), or the Pallas kernel (kernels/attention.py);
* LayerNorm (`layer_norm_impl`): flax's, or the Pallas kernels (kernels/layer_norm.py);
* a block's second half (`ffn_impl`): XLA, or the Pallas kernels (kernels/ffn.py);
* the cross-entropy (`ce_impl`, `ce_block_size`): chunked rows, item blocks, the table split
  over devices (training/losses.py) or the Pallas kernels (kernels/loss.py).

A kernel runs only where it computes what the XLA path would (the same masks, tiles that
fit); elsewhere the XLA path runs. Evaluation, serving and export keep XLA's paths, which
run on any backend. Model and training code ask here rather than choosing themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pka_jax import sharding
from pka_jax.kernels import attention as pallas_attention
from pka_jax.kernels import ffn as pallas_ffn
from pka_jax.kernels import layer_norm as pallas_layer_norm
from pka_jax.kernels import loss as pallas_loss
from pka_jax.training import losses

# plain: our masked softmax (kernels on the logits where cheaper; any dropout, CoPE);
# xla / cudnn: jax.nn.dot_product_attention, wherever attention weights see no dropout;
# auto: cudnn on GPU for 16-bit activations, else plain;
# pallas: auto, except that training with dropout on the weights runs one Pallas kernel a
# sequence and head wherever it applies, else plain.
ATTENTION_IMPLS = ('auto', 'plain', 'xla', 'cudnn', 'pallas')
LAYER_NORM_IMPLS = ('xla', 'pallas')
FFN_IMPLS = ('xla', 'pallas')
CE_IMPLS = ('xla', 'pallas')
# The config fields of the Pallas choices, and their XLA alternative.
PALLAS_FIELDS = {'attention_impl': 'auto', 'layer_norm_impl': 'xla', 'ffn_impl': 'xla',
                 'ce_impl': 'xla'}


def attention(impl: str, dtype: Any, *, contextual: bool, weight_dropout: bool) -> str:
  """The attention `impl` ('auto' included) runs as on this backend: 'plain', 'xla',
  'cudnn', or 'pallas' (where `pallas_attention_fits` too). CoPE reads the logits, and the
  fused kernels of `jax.nn.dot_product_attention` take no dropout on the weights."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'attention_impl {impl!r}: expected one of {ATTENTION_IMPLS}')
  if contextual:
    return 'plain'
  if impl == 'pallas' and not weight_dropout:
    impl = 'auto'
  if impl == 'auto':
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    impl = 'cudnn' if jax.default_backend() == 'gpu' and half else 'plain'
  if impl in ('xla', 'cudnn') and weight_dropout:
    return 'plain'
  return impl


def pallas_attention_fits(*, dropout_impl: str, stand_ins: bool, kernels_on_logits: bool,
                          whole_batch: bool, num_queries: int, num_keys: int,
                          head_dim: int) -> bool:
  """Whether the Pallas attention kernel computes what the plain path would: hashed masks
  of the whole batch's rows in order, no stand-in keys, kernels on the logits, tiles that
  fit."""
  return (dropout_impl == 'hash' and not stand_ins and kernels_on_logits and whole_batch
          and pallas_attention.supports(num_queries, num_keys, head_dim))


def layer_norm(*, impl: str, deterministic: bool, epsilon: float, dtype: Any,
               mesh: jax.sharding.Mesh | None, name: str) -> nn.Module:
  """flax's LayerNorm, or in training with `impl='pallas'` the kernels' (with flax's
  parameters; an evaluated, served or exported model keeps flax's, which runs anywhere)."""
  if impl == 'pallas' and not deterministic:
    return pallas_layer_norm.PallasLayerNorm(epsilon, dtype, mesh=mesh, name=name)
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name)


def fused_second_half(*, impl: str, deterministic: bool, hashed_masks: bool,
                      whole_batch: bool, batch: int, queries: int, width: int,
                      mesh: jax.sharding.Mesh | None) -> bool:
  """Whether a block's second half runs as the Pallas kernels and computes what the XLA path
  would: in training, hashed masks (or none) of the whole batch's rows in order, each
  device's rows (`batch × queries` positions of `width` in all) in blocks that fit."""
  shards = sharding.row_shards(mesh, batch)
  return (impl == 'pallas' and not deterministic and hashed_masks and whole_batch
          and batch % shards == 0 and pallas_ffn.supports(batch * queries // shards, width))


# cross_entropy(hidden_BxTxD, table_VxD, targets_BxT) -> (sum, count), on one device's rows.
CrossEntropy = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def cross_entropy(*, impl: str, block_size: int, chunk_rows: int) -> CrossEntropy:
  """The full-catalog cross-entropy on a whole item table: the Pallas kernels, items in
  blocks of `block_size` (if set), or rows in chunks of `chunk_rows`."""
  if impl == 'pallas':
    return pallas_loss.pallas_cross_entropy
  if block_size:
    return functools.partial(losses.blockwise_cross_entropy, block_size=block_size)
  return functools.partial(losses.chunked_cross_entropy, chunk_rows=chunk_rows)


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Where a config asks for a Pallas kernel that cannot run as asked (no GPU, or the loss
  kernel with another loss or a split table)."""
  backend = jax.default_backend()

  def needs_gpu(field: str) -> list[str]:
    if config.get(field) != 'pallas' or backend == 'gpu':
      return []
    return [f"{field}: 'pallas' runs Triton kernels and needs a GPU, not this {backend} "
            f'backend (use {PALLAS_FIELDS[field]!r})']

  problems = []
  if config.get('ce_impl') == 'pallas':
    problems += needs_gpu('ce_impl')
    if config.get('loss') != 'ce':
      problems.append(f"ce_impl: 'pallas' is a cross-entropy, but loss is "
                      f"{config.get('loss')!r}")
    if config.get('mesh_model', 1) != 1:
      problems.append(f"ce_impl: 'pallas' needs the whole item table on each device "
                      f"(mesh_model 1), got mesh_model {config.get('mesh_model')}")
  for field in ('attention_impl', 'layer_norm_impl', 'ffn_impl'):
    problems += needs_gpu(field)
  return problems
