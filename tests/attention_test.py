"""Position schemes against their formulas: masks, RoPE's relative property, CoPE positions."""

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pka_jax.model import attention
from pka_jax.model import encoder


def test_mask_hides_the_future_and_optionally_padding_keys():
  valid = jnp.array([[False, True, True]])
  np.testing.assert_array_equal(
      attention.attention_mask(valid, mask_padding_keys=True)[0, 0],
      [[False, False, False], [False, True, False], [False, True, True]])
  np.testing.assert_array_equal(
      attention.attention_mask(valid, mask_padding_keys=False)[0, 0],
      np.tril(np.ones((3, 3), bool)))


def test_rotary_logits_depend_only_on_the_distance():
  # B x T x H x K: the same query and key vector at each of 6 positions.
  q = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (8,)), (1, 6, 1, 8))
  k = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (8,)), (1, 6, 1, 8))
  logits = np.asarray(jnp.einsum('bihk,bjhk->ij', attention.rotary(q), attention.rotary(k)))
  # Shifting query and key by the same amount leaves every logit unchanged.
  np.testing.assert_allclose(logits[1:, 1:], logits[:-1, :-1], rtol=1e-5, atol=1e-5)
  assert not np.isclose(logits[0, 0], logits[3, 0])  # positions do matter
  np.testing.assert_allclose(np.linalg.norm(attention.rotary(q), axis=-1),
                             np.linalg.norm(q, axis=-1), rtol=1e-5)


def _cope_reading_positions(maxlen: int, head_dim: int, q, logits, mask):
  """ContextualPosition whose output is the position itself: the query layer sends every
  query to silu(1)·1 and the table's row p is p·e0/silu(1), linear in p, so interpolation
  between floor and ceiling is exact."""
  module = attention.ContextualPosition(maxlen=maxlen)
  params = module.init(jax.random.key(2), q, logits, mask)['params']
  silu_1 = 1.0 / (1.0 + np.exp(-1.0))
  params = {'positions': jnp.zeros((maxlen, head_dim)).at[:, 0].set(jnp.arange(maxlen) / silu_1),
            'query': {'kernel': jnp.zeros((head_dim, head_dim)), 'bias': jnp.ones(head_dim)}}
  return np.asarray(module.apply({'params': params}, q, logits, mask))


COPE_SIZE, COPE_DIM = 6, 4
COPE_MASK = jnp.tril(jnp.ones((COPE_SIZE, COPE_SIZE), bool))[None, None]


def test_contextual_positions_are_sums_of_gates_growing_from_the_query_back():
  q = jax.random.normal(jax.random.key(0), (1, 1, COPE_SIZE, COPE_DIM))
  logits = 2.0 * jax.random.normal(jax.random.key(1), (1, 1, COPE_SIZE, COPE_SIZE))
  position = _cope_reading_positions(COPE_SIZE + 10, COPE_DIM, q, logits, COPE_MASK)[0, 0]
  gate = 1.0 - 1.0 / (1.0 + np.exp(-np.asarray(logits)[0, 0]))
  for i in range(COPE_SIZE):
    for j in range(i + 1):
      # Key j sits at the number of (soft) counted keys from itself up to the query.
      np.testing.assert_allclose(position[i, j], sum(gate[i, m] for m in range(j, i + 1)),
                                 rtol=1e-5, atol=1e-6)
    steps = position[i, :i] - position[i, 1:i + 1]  # one step further back each
    assert (steps > 0).all() and (steps < 1).all()
    assert 0 < position[i, i] < 1
    np.testing.assert_array_equal(position[i, i + 1:], 0.0)  # future keys: position 0


def test_contextual_positions_are_clamped_to_the_table():
  q = jnp.ones((1, 1, COPE_SIZE, COPE_DIM))
  # Logits far below zero: every gate is 1 and positions count keys, 1 for the query itself.
  logits = jnp.full((1, 1, COPE_SIZE, COPE_SIZE), -50.0)
  maxlen = 4
  position = _cope_reading_positions(maxlen, COPE_DIM, q, logits, COPE_MASK)[0, 0]
  distance = np.arange(COPE_SIZE)[:, None] - np.arange(COPE_SIZE)[None, :]
  expected = np.where(distance >= 0, np.minimum(distance + 1, maxlen - 1), 0)
  np.testing.assert_allclose(position, expected, atol=1e-5)


def test_contextual_positions_never_read_the_future():
  q = jax.random.normal(jax.random.key(0), (1, 1, COPE_SIZE, COPE_DIM))
  logits = jax.random.normal(jax.random.key(1), (1, 1, COPE_SIZE, COPE_SIZE))
  module = attention.ContextualPosition(maxlen=COPE_SIZE)
  params = module.init(jax.random.key(2), q, logits, COPE_MASK)
  params = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape), params)
  out = np.asarray(module.apply(params, q, logits, COPE_MASK))[0, 0]
  future = ~np.asarray(COPE_MASK)[0, 0]
  changed = np.asarray(module.apply(params, q, jnp.where(future, 100.0, logits),
                                    COPE_MASK))[0, 0]
  np.testing.assert_allclose(changed[~future], out[~future], rtol=1e-6)


def test_untrained_contextual_model_is_nope():
  # The position table starts at zeros: at initialisation CoPE adds nothing to the logits.
  inputs = jnp.array([[0, 0, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], dtype=jnp.int32)
  config = encoder.ModelConfig(num_items=20, maxlen=6, num_blocks=2, hidden_units=8,
                              num_heads=2, dropout=0.0, position_mode='contextual',
                              deterministic=True)
  variables = encoder.Encoder(config).init(jax.random.key(0), inputs)
  tables = [variables['params'][f'block_{i}']['attention']['cope']['positions']
            for i in range(2)]
  np.testing.assert_array_equal(np.asarray(tables), 0.0)
  nope = dataclasses.replace(config, position_mode='none')
  np.testing.assert_allclose(encoder.Encoder(config).apply(variables, inputs),
                             encoder.Encoder(nope).apply(variables, inputs), rtol=1e-6)


def test_rotary_of_the_last_rows_equals_the_last_rows_of_rotary():
  x = jax.random.normal(jax.random.key(5), (2, 6, 2, 8))
  np.testing.assert_allclose(attention.rotary(x[:, -2:], first_position=4),
                             attention.rotary(x)[:, -2:], rtol=1e-6)


B, T, D = 3, 8, 16
VALID = jnp.array([[False] * 3 + [True] * 5, [True] * 8, [False] * 7 + [True]])


def lower_triangular(seed: int) -> jax.Array:
  return jnp.tril(jax.random.uniform(jax.random.key(seed), (T, T))) + jnp.eye(T)


@pytest.mark.parametrize('heads', [1, 2])
@pytest.mark.parametrize('mask_padding_keys', [True, False])
@pytest.mark.parametrize('sides', ['k', 'v', 'kv', ''])
def test_kernels_on_logits_on_inputs_and_fused_attention_agree(heads, mask_padding_keys, sides):
  # softmax((Q K'ᵀ) U + q·bk) (A F) V' + rowsum(A) bv  ==  softmax(Q Kᵀ) A V with K and V
  # computed from kernel-mixed inputs, == jax.nn.dot_product_attention on those inputs.
  x = jax.random.normal(jax.random.key(0), (B, T, D)) * VALID[..., None]
  q_in = jax.random.normal(jax.random.key(1), (B, T, D))
  kernels = {'k_kernel_TxT': lower_triangular(2) if 'k' in sides else None,
             'v_kernel_TxT': lower_triangular(3) if 'v' in sides else None}
  key_valid = VALID if mask_padding_keys else None

  def module(**fields):
    return attention.CausalSelfAttention(num_heads=heads, dropout=0.0, deterministic=True,
                                         **fields)

  params = module().init(jax.random.key(4), q_in, x, x, key_valid, **kernels)
  # Biases away from zero, so that their routes around the kernels are exercised.
  params = jax.tree.map(lambda p: p + 0.3, params)
  outputs = {
      name: np.asarray(module(**fields).apply(params, q_in, x, x, key_valid, **kernels))
      for name, fields in [('logits', dict(kernels_on_logits=True)),
                           ('inputs', dict(kernels_on_logits=False)),
                           ('fused', dict(impl='xla'))]}
  # Rows of padded queries see no key; the block zeroes them, so only real queries count.
  real = np.asarray(VALID)
  for name in ('inputs', 'fused'):
    np.testing.assert_allclose(outputs['logits'][real], outputs[name][real], rtol=2e-5,
                               atol=2e-5, err_msg=name)


def test_one_query_row_equals_the_last_row_of_all_queries():
  x = jax.random.normal(jax.random.key(0), (B, T, D)) * VALID[..., None]
  kernels = {'k_kernel_TxT': lower_triangular(2), 'v_kernel_TxT': lower_triangular(3)}
  module = attention.CausalSelfAttention(num_heads=2, dropout=0.0, deterministic=True)
  params = module.init(jax.random.key(4), x, x, x, VALID, **kernels)
  every = module.apply(params, x, x, x, VALID, **kernels)
  last = module.apply(params, x[:, -1:], x, x, VALID, **kernels)
  np.testing.assert_allclose(last[:, 0], every[:, -1], rtol=2e-5, atol=2e-5)


def _authors_cape_logits(query_TxBxE, key_TxBxE, in_proj_weight, in_proj_bias, num_heads,
                         pre_proj_weight, pre_proj_bias, pos_emb, max_len):
  """The authors' CoPE attention logits, transcribed to numpy from anonymcode/IJCAI2026,
  models/SASRec_custom.py: `MultiheadAttentionCAPE.forward` up to the softmax, with
  `CAPE.forward` inlined, as `SASRec.log2feats` calls it (causal `attn_mask`, no
  `key_padding_mask`: padding keys are visible). Torch layouts: `Linear` weights are
  `out × in`, `pos_emb` is `1 × head_dim × max_len`. Returns the logits `B×H×T×T` and the
  clamped positions."""
  tgt_len, bsz, embed_dim = query_TxBxE.shape
  src_len = key_TxBxE.shape[0]
  head_dim = embed_dim // num_heads
  q = query_TxBxE @ in_proj_weight[:embed_dim].T + in_proj_bias[:embed_dim]
  k_rows = slice(embed_dim, 2 * embed_dim)
  k = key_TxBxE @ in_proj_weight[k_rows].T + in_proj_bias[k_rows]
  q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(1, 0, 2)
  k = k.reshape(src_len, bsz * num_heads, head_dim).transpose(1, 0, 2)
  attn_mask = ~np.tril(np.ones((tgt_len, src_len), bool))
  combined_mask = np.where(attn_mask, -np.inf, 0.0)[None]
  attn_weights = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim)
  causal_mask_bool = np.triu(np.ones((tgt_len, src_len), bool), k=1)
  attn_weights = attn_weights + combined_mask
  # CAPE.forward(q, attn_weights, causal_mask=causal_mask_bool)
  G = 1 - 1 / (1 + np.exp(-attn_weights))
  G = np.where(causal_mask_bool, 0.0, G)
  P = np.flip(np.cumsum(np.flip(G, -1), axis=-1), -1)
  P = np.minimum(P, max_len - 1)
  P_ceil = np.ceil(P).astype(np.int64)
  P_floor = np.floor(P).astype(np.int64)
  pre = q @ pre_proj_weight.T + pre_proj_bias
  query = pre / (1 + np.exp(-pre))  # SiLU
  E = query @ pos_emb
  E_ceil = np.take_along_axis(E, P_ceil, axis=-1)
  E_floor = np.take_along_axis(E, P_floor, axis=-1)
  P_frac = P - P_floor
  E = P_frac * E_ceil + (1 - P_frac) * E_floor
  attn_weights = attn_weights + E
  shape = (bsz, num_heads, tgt_len, src_len)
  return attn_weights.reshape(shape), P.reshape(shape)


@pytest.mark.parametrize('mask_padding_keys', [True, False])
def test_contextual_logits_equal_the_authors_cape(mask_padding_keys):
  heads, cope_maxlen = 2, 4  # positions reach past the table: the clamp is exercised
  x = jax.random.normal(jax.random.key(0), (B, T, D)) * VALID[..., None]  # as theirs feeds
  q_in = jax.random.normal(jax.random.key(1), (B, T, D))
  key_valid = VALID if mask_padding_keys else None
  module = attention.CausalSelfAttention(num_heads=heads, dropout=0.0, deterministic=True,
                                         cope_maxlen=cope_maxlen)
  params = module.init(jax.random.key(2), q_in, x, x, key_valid)
  # Every parameter random, the zero-initialised biases and position table included.
  leaves, tree = jax.tree.flatten(params)
  draws = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [leaf + 0.1 * jax.random.normal(draw, leaf.shape)
                                     for leaf, draw in zip(leaves, draws)])

  seen = {}

  def keep_contextual_call(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, attention.ContextualPosition):
      # The logits it reads plus what it returns: what the attention then masks and softmaxes.
      seen['logits'] = np.asarray(args[1] + out)
    return out

  # Full float32 products wherever this runs (GPUs otherwise take float32 products as TF32).
  with nn.intercept_methods(keep_contextual_call), jax.default_matmul_precision('float32'):
    module.apply(params, q_in, x, x, key_valid)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params['params'])
  in_proj_weight = np.concatenate([p[name]['kernel'].T for name in ('query', 'key', 'value')])
  in_proj_bias = np.concatenate([p[name]['bias'] for name in ('query', 'key', 'value')])
  theirs, positions = _authors_cape_logits(
      np.asarray(q_in, np.float64).transpose(1, 0, 2),
      np.asarray(x, np.float64).transpose(1, 0, 2), in_proj_weight, in_proj_bias, heads,
      p['cope']['query']['kernel'].T, p['cope']['query']['bias'],
      p['cope']['positions'].T[None], cope_maxlen)

  # Compared: each query at its visible keys (key <= query; theirs puts -inf on the rest,
  # ours masks them after). With padding keys visible to ours too, every such pair. Masked,
  # their gates are 0 in ours and counted in theirs; but left padding lies before every
  # real key, and a key's position sums the gates from that key up to the query only, so
  # real keys' positions, and real queries' logits at them, are the same. Only those pairs
  # are compared then: padding keys sit at other positions in the two, and a padding query
  # (whose output the block zeroes) sees no key in ours.
  causal = np.tril(np.ones((T, T), bool))
  valid = np.asarray(VALID)
  real_pairs = (valid[:, :, None] & valid[:, None, :] if mask_padding_keys
                else np.ones((B, T, T), bool))
  compared = np.broadcast_to((causal & real_pairs)[:, None], theirs.shape)
  np.testing.assert_allclose(seen['logits'][compared], theirs[compared], rtol=1e-6, atol=1e-6)
  assert (positions[compared] == cope_maxlen - 1).any()
  assert (positions[compared] % 1 != 0).any()  # interpolated between table rows
  if mask_padding_keys:
    # Where theirs counts padding gates, the two do differ.
    padding_keys = np.broadcast_to(
        (causal & valid[:, :, None] & ~valid[:, None, :])[:, None], theirs.shape)
    assert not np.allclose(seen['logits'][padding_keys], theirs[padding_keys], atol=1e-3)


def _library_fusions_summing_products(hlo_text: str) -> list[str]:
  """The shapes of products that a CPU library fusion (YNNPACK) sums, one per fusion."""
  shapes = []
  for name, body in re.findall(r'\n%(\S+) \([^\n]*\{\n(.*?)\n\}', hlo_text, re.DOTALL):
    called_by_library = re.search(rf'kind=kCustom, calls=%{re.escape(name)},', hlo_text)
    if called_by_library and ' reduce(' in body:
      shapes += re.findall(r'= \w+\[([\d,]*)\]\S* multiply\(', body)
  return shapes


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='a CPU compiler property')
def test_attention_gradient_sums_no_product_over_a_unit_dimension_on_cpu():
  # XLA 0.10.2's CPU library fusions sum a product ~8x slower over a shape with a dimension
  # of size 1 than over the same numbers as a matrix: with one head, the softmax's gradient
  # (a sum of p·dp over keys) cost 5% of the ML-1M PKA train step until it ran on rows.
  x = jax.random.normal(jax.random.key(0), (16, 32, 64))
  module = attention.CausalSelfAttention(num_heads=1, dropout=0.3, deterministic=False)
  params = module.init(jax.random.key(1), x, x, x, None)

  def loss(params, x):
    out = module.apply(params, x, x, x, None, rngs={'dropout': jax.random.key(2)})
    return jnp.sum(out ** 2)

  hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
  summed = _library_fusions_summing_products(hlo)
  if not summed:
    pytest.skip('this XLA fuses no summed product into a library call')
  unit = [shape for shape in summed if '1' in shape.split(',')]
  assert not unit, f'products summed over shapes with a unit dimension: {unit}'
