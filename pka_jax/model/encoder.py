"""The SASRec encoder with pluggable position schemes (docs/design.md §1) and tied item scores."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pka_jax import sharding
from pka_jax.kernels import dispatch
from pka_jax.kernels import ffn as pallas_ffn
from pka_jax.kernels import sharded
from pka_jax.model import attention
from pka_jax.model import item_table
from pka_jax.model.dropout import DROPOUT_IMPLS, Dropout, StandIns, Window

POSITION_MODES = ('none', 'absolute', 'absolute_all', 'rotary', 'contextual', 'kernel')
DTYPES = ('float32', 'bfloat16')
LN_EPSILON = 1e-8


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the encoder needs; built once from the ConfigDict (`from_config`)."""

  num_items: int
  maxlen: int
  num_blocks: int
  hidden_units: int
  num_heads: int
  dropout: float
  position_mode: str
  mask_padding_keys: bool = True
  kernel_q_side: str = 'none'
  kernel_k_side: str = 'toeplitz'
  kernel_v_side: str = 'full'
  share_toeplitz: bool = False
  share_full: bool = True
  kernel_init_std: float = 0.02
  # Activations and matmuls; parameters, softmax and loss stay float32.
  dtype: str = 'float32'
  attention_impl: str = 'auto'  # dispatch.ATTENTION_IMPLS
  dropout_impl: str = 'hash'  # dropout.DROPOUT_IMPLS
  layer_norm_impl: str = 'xla'  # dispatch.LAYER_NORM_IMPLS
  ffn_impl: str = 'xla'  # dispatch.FFN_IMPLS
  # Devices the item table's rows are split over (the mesh's 'model' axis; sharding.py).
  mesh_model: int = 1
  deterministic: bool = False

  def __post_init__(self):
    if self.position_mode not in POSITION_MODES:
      raise ValueError(f'position_mode {self.position_mode!r}: expected one of {POSITION_MODES}')
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype {self.dtype!r}: expected one of {DTYPES}')
    if self.attention_impl not in dispatch.ATTENTION_IMPLS:
      raise ValueError(f'attention_impl {self.attention_impl!r}: expected one of '
                       f'{dispatch.ATTENTION_IMPLS}')
    if self.layer_norm_impl not in dispatch.LAYER_NORM_IMPLS:
      raise ValueError(f'layer_norm_impl {self.layer_norm_impl!r}: expected one of '
                       f'{dispatch.LAYER_NORM_IMPLS}')
    if self.ffn_impl not in dispatch.FFN_IMPLS:
      raise ValueError(f'ffn_impl {self.ffn_impl!r}: expected one of {dispatch.FFN_IMPLS}')
    if self.dropout_impl not in DROPOUT_IMPLS:
      raise ValueError(f'dropout_impl {self.dropout_impl!r}: expected one of {DROPOUT_IMPLS}')
    for side in ('q', 'k', 'v'):
      kind = getattr(self, f'kernel_{side}_side')
      if kind not in attention.KERNEL_KINDS:
        raise ValueError(f'kernel_{side}_side {kind!r}: expected one of {attention.KERNEL_KINDS}')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_items: int) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(cls)} - {'num_items', 'deterministic'}
    return cls(num_items=num_items,
               **{name: config[name] for name in fields if name in config})

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def table_rows(self) -> int:
    """Rows of the item table: padding, the items, unused rows filling the last shard."""
    return item_table.table_rows(self.num_items, self.mesh_model)

  @property
  def trims_exactly(self) -> bool:
    """Whether leading columns that are padding in every row can be dropped from a window
    without changing any real position's output (Encoder). Not when padding keys are visible,
    nor with a query-side kernel: it mixes the layer-normed padding rows (LN(0) is the
    LayerNorm's bias) into real queries."""
    return self.mask_padding_keys and self.kernel_kind('q') == 'none'

  @property
  def padding_keys_alike(self) -> bool:
    """Visible padding keys that are all one key: zeroed inputs make the key and value biases,
    unless positions act inside the blocks (ALL-APE, RoPE, CoPE, kernels). A trimmed window
    then stands for the full one once its padding keys weigh as many as the full window's
    (`Encoder`), which needs one padding column in every row that is not full."""
    return not self.mask_padding_keys and self.position_mode in ('none', 'absolute')

  @property
  def trims_in_training(self) -> bool:
    """Whether training windows can be cut without changing the step: where `trims_exactly`
    or, with alike padding keys, where dropout masks are hashed (or off): each trimmed row's
    padding columns then keep the share of its full window's padding keys that those masks
    keep (dropout.StandIns)."""
    hashed = self.dropout_impl == 'hash' or self.dropout == 0.0
    return self.trims_exactly or (self.padding_keys_alike and hashed)

  def evaluation_windows(self, trim_windows: bool) -> dict[str, bool]:
    """How evaluation and recommendation cut their windows (`SuccessiveSteps.batch`'s
    options), given `config.trim_windows`: where exact without dropout, to the columns a
    batch needs, keeping a padding column in every row not full where padding keys are
    alike."""
    alike = trim_windows and self.padding_keys_alike
    return {'trim': (trim_windows and self.trims_exactly) or alike, 'padding_column': alike}

  def kernel_kind(self, side: str) -> str:
    return getattr(self, f'kernel_{side}_side') if self.position_mode == 'kernel' else 'none'

  def kernel_shared(self, side: str) -> bool:
    kind = self.kernel_kind(side)
    return (kind == 'toeplitz' and self.share_toeplitz) or (kind == 'full' and self.share_full)


def _kernel(config: ModelConfig, side: str, name: str):
  return attention.make_kernel(
      config.kernel_kind(side), maxlen=config.maxlen, init_std=config.kernel_init_std,
      learn_first=(side == 'v'), name=name)


def _layer_norm(name: str, config: ModelConfig, mesh: jax.sharding.Mesh | None) -> nn.Module:
  return dispatch.layer_norm(impl=config.layer_norm_impl, deterministic=config.deterministic,
                             epsilon=LN_EPSILON, dtype=config.compute_dtype, mesh=mesh,
                             name=name)


def _dense(features: int, name: str, dtype):
  """`x W + b` with flax `Dense`'s parameters, on rows (attention.dot_rows)."""
  projection = attention.Projection(features, dtype, name=name)
  return lambda x: projection(x)[0]


def _rows_then_zeros(init, rows: int):
  """`init` of the first `rows` rows, zeros below: the item table starts the same whatever
  rows pad it (item_table.table_rows)."""

  def padded(key, shape, dtype=jnp.float32):
    return jnp.pad(init(key, (rows, *shape[1:]), dtype), ((0, shape[0] - rows), (0, 0)))

  return padded


class Block(nn.Module):
  """One block in the authors' order: the residual is taken from the layer-normed input.

  With `last_only`, keys and values cover every position but only the newest position is
  queried: the output is `B×1×D`, all the successive evaluation and recommendation need.
  """

  config: ModelConfig
  mesh: jax.sharding.Mesh | None = None  # the step's, for a kernel that runs per row shard

  @nn.compact
  def __call__(self, x_BxTxD, valid_BxT, shared_kernels: dict[str, jax.Array], *,
               window: Window, padding: StandIns | None = None,
               last_only: bool = False) -> jax.Array:
    config, dtype = self.config, self.config.compute_dtype
    width = x_BxTxD.shape[1]
    num_queries = 1 if last_only else width
    kernels = dict(shared_kernels)
    for side in ('q', 'k', 'v'):
      if config.kernel_kind(side) != 'none' and not config.kernel_shared(side):
        kernels[side] = _kernel(config, side, f'{side}_{config.kernel_kind(side)}')()
    # A window narrower than maxlen is its right end: the kernels' bottom-right corner.
    kernels = {side: kernel[-width:, -width:] for side, kernel in kernels.items()}

    normed_BxTxD = _layer_norm('ln_attn', config, self.mesh)(x_BxTxD)
    k_in, v_in = x_BxTxD, x_BxTxD
    if config.position_mode == 'absolute_all':
      pos_TxD = self.param('pos_emb', nn.initializers.xavier_uniform(),
                           (config.maxlen, config.hidden_units))[-width:].astype(dtype)
      normed_BxTxD, k_in, v_in = (a + pos_TxD[None] for a in (normed_BxTxD, k_in, v_in))
    q_in_BxQxD = normed_BxTxD[:, -num_queries:]
    query_BxQxD = q_in_BxQxD
    if 'q' in kernels:
      query_BxQxD = attention.apply_kernel(kernels['q'][-num_queries:], normed_BxTxD)
    # The feed-forward kernels run the attention's output projection themselves (three
    # kernels fewer in the longest chain: the product and its bias forward, the product
    # backward).
    fused_ffn = dispatch.fused_second_half(
        impl=config.ffn_impl, deterministic=config.deterministic,
        hashed_masks=config.dropout_impl == 'hash' or config.dropout == 0.0,
        whole_batch=window is None or window.rows_B is None,
        batch=q_in_BxQxD.shape[0], queries=num_queries, width=config.hidden_units,
        mesh=self.mesh)
    attended = attention.CausalSelfAttention(
        num_heads=config.num_heads, dropout=config.dropout,
        deterministic=config.deterministic, rope=config.position_mode == 'rotary',
        cope_maxlen=config.maxlen if config.position_mode == 'contextual' else 0,
        impl=config.attention_impl, dtype=dtype, dropout_impl=config.dropout_impl,
        mesh=self.mesh, name='attention')(
            query_BxQxD, k_in, v_in, valid_BxT if config.mask_padding_keys else None,
            k_kernel_TxT=kernels.get('k'), v_kernel_TxT=kernels.get('v'),
            first_position=config.maxlen - width, window=window, padding=padding,
            out_projection_outside=fused_ffn)
    valid_BxQ = valid_BxT[:, -num_queries:]
    if fused_ffn:
      return self._pallas_ffn(q_in_BxQxD, *attended, valid_BxQ, window)
    h_BxQxD = q_in_BxQxD + attended

    y_BxQxD = _layer_norm('ln_ffn', config, self.mesh)(h_BxQxD)
    drop = Dropout(config.dropout, config.deterministic, config.dropout_impl)
    hidden = drop(nn.relu(_dense(config.hidden_units, 'ffn_in', dtype)(y_BxQxD)), window)
    z_BxQxD = y_BxQxD + drop(_dense(config.hidden_units, 'ffn_out', dtype)(hidden), window)
    return z_BxQxD * valid_BxQ[..., None].astype(dtype)

  def _pallas_ffn(self, q_in_BxQxD, mixed_BxQxD, w_proj_DxD, b_proj_D, valid_BxQ,
                  window: Window | None) -> jax.Array:
    """The block's second half (the attention's output projection, residual, LayerNorm,
    feed-forward, dropout, mask) by pallas_ffn's kernels, with the XLA path's parameters and
    dropout masks; `mixed` is the attention's heads before that projection."""
    config = self.config
    batch, queries, width = q_in_BxQxD.shape
    ones, zeros = nn.initializers.ones, nn.initializers.zeros
    ln = attention.Declared((('scale', ones, (width,)), ('bias', zeros, (width,))),
                            name='ln_ffn')()
    ffn_in = attention.Declared(attention.projection_specs(width, width), name='ffn_in')()
    ffn_out = attention.Declared(attention.projection_specs(width, width), name='ffn_out')()
    drop = Dropout(config.dropout, config.deterministic, config.dropout_impl)
    # The XLA path's two calls of `drop` draw these words, in this order.
    seeds_2x2 = (jnp.stack([drop.seed_words(), drop.seed_words()]) if config.dropout > 0
                 else jnp.zeros((2, 2), jnp.uint32))
    shards = sharding.row_shards(self.mesh, batch)
    options = pallas_ffn.Options(
        epsilon=LN_EPSILON, rate=config.dropout, queries=queries,
        full_q=queries if window is None else window.maxlen,
        block_rows=pallas_ffn.block_rows_for(batch * queries // shards))
    params = (w_proj_DxD, b_proj_D, ln['scale'], ln['bias'], ffn_in['kernel'], ffn_in['bias'],
              ffn_out['kernel'], ffn_out['bias'], seeds_2x2)

    def second_half(q_in, mixed, valid, w_proj, b_proj, *params, first_row, options):
      rows = lambda x: x.reshape(-1, width)
      return pallas_ffn.feed_forward(rows(q_in), rows(mixed), w_proj, b_proj, valid.reshape(-1),
                                     *params, options, first_row).reshape(q_in.shape)

    return sharded.per_row_shard(
        second_half, options, self.mesh, (q_in_BxQxD, mixed_BxQxD, valid_BxQ, *params),
        rows=(True,) * 3 + (False,) * len(params))


def _padding_stand_ins(valid_BxT: jax.Array, maxlen: int) -> StandIns:
  """A trimmed row's `W - L` padding keys stand for the `maxlen - L` of its full window."""
  return StandIns(columns_BxT=~valid_BxT, count_B=maxlen - valid_BxT.sum(axis=1))


class Encoder(nn.Module):
  """Item ids `B×T` (left-padded with 0) to hidden states `B×T×D`; scores by tied weights.

  A window of `W < maxlen` columns stands for the last `W` positions of a `maxlen` window
  whose first `maxlen - W` are padding; where `config.trims_exactly`, every real position's
  output is the same as in the full window (training and evaluation trim windows this way).
  So it is where `config.padding_keys_alike` and every row that is not full keeps a padding
  column: the padding keys' logits are raised to weigh as the full window's, and dropout
  keeps of them the share it keeps of the full window's (`config.trims_in_training`).

  `mesh`: the device mesh whose 'model' axis splits the item table's rows (sharding.py), or
  None for an unsharded table.
  """

  config: ModelConfig
  mesh: jax.sharding.Mesh | None = None

  def setup(self):
    config = self.config
    self.item_emb = nn.Embed(
        config.table_rows, config.hidden_units,
        embedding_init=_rows_then_zeros(nn.initializers.xavier_uniform(), config.num_items + 1),
        name='item_emb')
    if config.position_mode == 'absolute':
      self.pos_emb = nn.Embed(
          config.maxlen, config.hidden_units,
          embedding_init=nn.initializers.xavier_uniform(), name='pos_emb')
    self.shared_kernels = {
        side: _kernel(config, side, f'shared_{side}_{config.kernel_kind(side)}')
        for side in ('q', 'k', 'v')
        if config.kernel_kind(side) != 'none' and config.kernel_shared(side)}
    self.blocks = [Block(config, mesh=self.mesh, name=f'block_{i}')
                   for i in range(config.num_blocks)]
    self.ln_final = _layer_norm('ln_final', config, self.mesh)
    self.embed_dropout = Dropout(config.dropout, config.deterministic, config.dropout_impl)

  def __call__(self, inputs_BxT: jax.Array, *, last_only: bool = False,
               rows_B: jax.Array | None = None) -> jax.Array:
    """Hidden states after the final LayerNorm: `B×T×D`, or `B×1×D` for the newest position
    alone with `last_only` (the last block then queries that position only).

    `rows_B`: which rows of the step's batch these are (a microbatch's); dropout masks follow
    each element's place in that batch at full width (dropout.Window)."""
    config, dtype = self.config, self.config.compute_dtype
    width = inputs_BxT.shape[1]
    if width > config.maxlen:
      raise ValueError(f'inputs have {width} positions; the model takes at most maxlen = '
                       f'{config.maxlen}')
    # With the table split, each device encodes its share of the rows (sharding.row_axes).
    valid_BxT = sharding.split_rows(inputs_BxT != 0, self.mesh)
    if self.mesh is not None and self.mesh.shape[sharding.MODEL] > 1:
      x_BxTxD = sharding.lookup(self.item_emb.embedding, inputs_BxT, self.mesh)
    else:
      x_BxTxD = self.item_emb(inputs_BxT)
    x_BxTxD = x_BxTxD * math.sqrt(config.hidden_units)
    if config.position_mode == 'absolute':
      x_BxTxD = x_BxTxD + self.pos_emb(jnp.arange(config.maxlen - width, config.maxlen))[None]
    window = Window(config.maxlen, rows_B)
    x_BxTxD = (self.embed_dropout(x_BxTxD.astype(dtype), window)
               * valid_BxT[..., None].astype(dtype))
    # A zero no-op unless a 'perturbations' collection is passed: tests read input gradients.
    x_BxTxD = self.perturb('embeddings', x_BxTxD)
    kernels = {side: kernel() for side, kernel in self.shared_kernels.items()}
    padding = None
    if config.padding_keys_alike and width < config.maxlen:
      padding = _padding_stand_ins(valid_BxT, config.maxlen)
    for i, block in enumerate(self.blocks):
      x_BxTxD = block(x_BxTxD, valid_BxT, kernels, window=window, padding=padding,
                      last_only=last_only and i == len(self.blocks) - 1)
    return self.ln_final(x_BxTxD)

  def item_embeddings(self) -> jax.Array:
    """The `(N + 1)×D` item table (row 0 is padding), the output layer by weight tying."""
    return self.item_emb.embedding[:self.config.num_items + 1]

  def encode_last(self, inputs_BxT: jax.Array) -> jax.Array:
    """The hidden state `B×D` after the newest position: what scores every next item."""
    return self(inputs_BxT, last_only=True)[:, -1]

  def score_last(self, inputs_BxT: jax.Array) -> jax.Array:
    """Scores `B×(N + 1)` of every item after the newest position (column 0 is padding)."""
    dtype = self.config.compute_dtype
    return jnp.dot(self.encode_last(inputs_BxT), self.item_embeddings().T.astype(dtype),
                   preferred_element_type=jnp.float32)


def create_model(config: ml_collections.ConfigDict, num_items: int, *, deterministic: bool,
                 mesh: jax.sharding.Mesh | None = None) -> Encoder:
  """The encoder a config describes, for a catalog of `num_items` items."""
  model_config = ModelConfig.from_config(config, num_items)
  return Encoder(dataclasses.replace(model_config, deterministic=deterministic), mesh=mesh)
