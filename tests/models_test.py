"""Model tests: kernels equal their formulas, causality, padding, jit, parameter count."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import jaxprs
import numpy as np
import pytest

from configs import default
from pka_jax.model import attention
from pka_jax.model.encoder import POSITION_MODES, Encoder, ModelConfig

T, D, N = 6, 8, 20


def make_config(position_mode='kernel', **overrides) -> ModelConfig:
  fields = dict(num_items=N, maxlen=T, num_blocks=2, hidden_units=D, num_heads=2, dropout=0.0,
                position_mode=position_mode, deterministic=True)
  return ModelConfig(**{**fields, **overrides})


INPUTS = jnp.array([[0, 0, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], dtype=jnp.int32)


def init(config: ModelConfig, inputs=INPUTS):
  return Encoder(config).init(jax.random.key(0), inputs)


def test_toeplitz_kernel_equals_formula():
  kernel = attention.ToeplitzKernel(maxlen=T, init_std=0.02)
  params = kernel.init(jax.random.key(1))
  tail = np.asarray(params['params']['g_tail'])
  assert (tail >= 0).all() and tail.max() > 0  # |N(0, 0.02)|, not all zero
  g = np.concatenate([[1.0], tail])
  g /= np.linalg.norm(g)
  expected = np.array([[g[i - j] if i >= j else 0.0 for j in range(T)] for i in range(T)])
  np.testing.assert_allclose(kernel.apply(params), expected, rtol=1e-6)


@pytest.mark.parametrize('size', [1, 2, 5, 128])
def test_toeplitz_matrix_and_its_gradient_match_a_loop(size):
  g = np.random.default_rng(size).standard_normal(size).astype(np.float32)
  expected = np.array([[g[i - j] if i >= j else 0.0 for j in range(size)]
                       for i in range(size)])
  np.testing.assert_array_equal(attention.toeplitz_matrix(jnp.asarray(g)), expected)
  # d sum(W * M) / d g[k] is the sum of W's k-th diagonal below the main one.
  w = np.random.default_rng(size + 1).standard_normal((size, size))
  grad = jax.grad(lambda g: jnp.sum(w * attention.toeplitz_matrix(g)))(jnp.asarray(g))
  np.testing.assert_allclose(grad, [np.trace(w, offset=-k) for k in range(size)], rtol=1e-5)


def test_value_side_toeplitz_learns_its_first_entry():
  kernel = attention.ToeplitzKernel(maxlen=T, init_std=0.02, learn_first=True)
  params = kernel.init(jax.random.key(1))
  params['params']['g_first'] = jnp.array([3.0])
  g = np.concatenate([[3.0], np.asarray(params['params']['g_tail'])])
  np.testing.assert_allclose(np.diag(kernel.apply(params)), np.full(T, 3.0 / np.linalg.norm(g)),
                             rtol=1e-6)


def test_full_kernel_equals_formula():
  kernel = attention.FullKernel(maxlen=T, init_std=0.02)
  params = kernel.init(jax.random.key(2))
  raw = np.asarray(params['params']['f'])
  np.testing.assert_array_equal(np.diag(raw), np.ones(T))  # I + |N| strictly below
  below = raw[np.tril_indices(T, k=-1)]
  assert (below >= 0).all() and below.max() > 0
  triangle = np.tril(raw)
  np.testing.assert_allclose(kernel.apply(params), triangle / np.linalg.norm(triangle),
                             rtol=1e-6)
  # Entries above the diagonal never reach the matrix, whatever the parameters hold.
  params['params']['f'] = params['params']['f'] + jnp.triu(jnp.ones((T, T)), k=1)
  np.testing.assert_allclose(kernel.apply(params), triangle / np.linalg.norm(triangle),
                             rtol=1e-6)


@pytest.mark.parametrize('mode', POSITION_MODES)
def test_shapes_and_finite_scores(mode):
  config = make_config(mode)
  variables = init(config)
  hidden = Encoder(config).apply(variables, INPUTS)
  scores = Encoder(config).apply(variables, INPUTS, method=Encoder.score_last)
  chex.assert_shape(hidden, (2, T, D))
  chex.assert_shape(scores, (2, N + 1))
  chex.assert_tree_all_finite((hidden, scores))


# Every ablation the configs name (configs/default.py), plus per-block full kernels.
KERNEL_LAYOUTS = [dict(zip(default.KERNEL_FIELDS, fields))
                  for fields in default.KERNEL_LAYOUTS.values()] + [dict(share_full=False)]


@pytest.mark.parametrize(
    'mode,overrides',
    [(m, {}) for m in POSITION_MODES] + [('kernel', o) for o in KERNEL_LAYOUTS])
def test_causal_through_gradients(mode, overrides):
  config = make_config(mode, **overrides)
  variables = init(config)
  model = Encoder(config)
  perturbations = variables['perturbations']
  # A random read-out: the plain sum of a LayerNorm output is constant, its gradient zero.
  readout = jax.random.normal(jax.random.key(3), (D,))

  def outputs_BxT(perturbations):
    return model.apply({**variables, 'perturbations': perturbations}, INPUTS) @ readout

  # d output[b, t] / d input[b', s] for every pair: B x T x B x T x D.
  jacobian = jax.jacrev(outputs_BxT)(perturbations)['embeddings']
  for t in range(T):
    np.testing.assert_array_equal(jacobian[:, t, :, t + 1:], 0.0,
                                  err_msg=f'position {t} sees the future')
    assert np.abs(jacobian[1, t, 1, :t + 1]).max() > 0, f'position {t} sees nothing of its past'


@pytest.mark.parametrize('mode', POSITION_MODES)
def test_padding_embedding_cannot_change_real_positions(mode):
  config = make_config(mode)
  variables = init(config)
  changed = jax.tree.map(lambda x: x, variables)
  table = changed['params']['item_emb']['embedding']
  changed['params']['item_emb']['embedding'] = table.at[0].set(100.0)
  real = INPUTS != 0
  before = Encoder(config).apply(variables, INPUTS)
  after = Encoder(config).apply(changed, INPUTS)
  np.testing.assert_allclose(after[real], before[real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mode', ['none', 'rotary'])
def test_amount_of_padding_is_invisible_when_padding_keys_are_masked(mode):
  # These modes have no parameter shaped by T: the same parameters read any length.
  short, long = jnp.array([[0, 4, 5, 6]]), jnp.array([[0, 0, 0, 4, 5, 6]])
  for mask_padding_keys, invisible in ((True, True), (False, False)):
    config = make_config(mode, maxlen=6, mask_padding_keys=mask_padding_keys)
    params = init(config, long)['params']
    # Nonzero biases: with unmasked padding keys these are what padding contributes.
    variables = {'params': jax.tree.map(lambda x: x + 0.1, params)}
    out_short = Encoder(dataclasses.replace(config, maxlen=4)).apply(variables, short)[:, 1:]
    out_long = Encoder(config).apply(variables, long)[:, 3:]
    assert np.allclose(out_short, out_long, atol=1e-5) == invisible, mask_padding_keys


SHORT = jnp.array([[0, 0, 0, 0, 5, 6], [0, 0, 0, 9, 10, 11]], dtype=jnp.int32)


def _perturbed(variables, scale=0.1):
  """Every parameter moved off its initial value (biases, CoPE's table): nothing is trivially
  zero, so padding that leaked into real positions would show."""
  leaves, tree = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.key(7), len(leaves))
  moved = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return {'params': jax.tree.unflatten(tree, moved)}


@pytest.mark.parametrize(
    'mode,overrides',
    [(m, {}) for m in POSITION_MODES] + [('kernel', o) for o in KERNEL_LAYOUTS])
def test_a_trimmed_window_is_the_right_end_of_the_full_one(mode, overrides):
  # Evaluation drops leading columns that are padding in every row; positions keep their
  # place counted from the right end, so the real positions' outputs must not change.
  config = make_config(mode, **overrides)
  variables = _perturbed(init(config))
  model = Encoder(config)
  full = model.apply(variables, SHORT)
  for width in (3, 4):
    trimmed = model.apply(variables, SHORT[:, -width:])
    real = SHORT[:, -width:] != 0
    same = np.allclose(trimmed[real], full[:, -width:][real], rtol=1e-5, atol=1e-5)
    # The query-side kernel mixes LN(padding) = the LayerNorm bias into real queries.
    assert same == config.trims_exactly == (overrides.get('kernel_q_side') != 'toeplitz')
    if same:
      np.testing.assert_allclose(
          model.apply(variables, SHORT[:, -width:], method=Encoder.score_last),
          model.apply(variables, SHORT, method=Encoder.score_last), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode', POSITION_MODES)
def test_with_visible_padding_keys_a_window_trims_only_if_they_are_alike(mode):
  # The authors' masking lets padding keys in. Where they are all one key (zeroed inputs, no
  # position inside the blocks) a trimmed window can weigh its padding keys as the full
  # window's, if every row that is not full keeps a padding column.
  config = make_config(mode, mask_padding_keys=False)
  assert not config.trims_exactly
  assert config.padding_keys_alike == (mode in ('none', 'absolute'))
  variables = _perturbed(init(config))
  model = Encoder(config)
  full = model.apply(variables, SHORT, method=Encoder.score_last)
  keeping_padding = model.apply(variables, SHORT[:, -4:], method=Encoder.score_last)
  same = np.allclose(keeping_padding, full, rtol=1e-5, atol=1e-5)
  assert same == config.padding_keys_alike
  # Three columns leave the second row (3 items) none: nothing can stand for its padding.
  no_padding_left = model.apply(variables, SHORT[:, -3:], method=Encoder.score_last)
  assert not np.allclose(no_padding_left, full, atol=1e-3)


@pytest.mark.parametrize('mode', ['none', 'absolute', 'rotary'])
def test_with_dropout_alike_padding_keys_still_trim_through_their_share_of_the_masks(mode):
  # Training: dropout on the attention weights drops each of the full window's padding keys
  # on its own; a trimmed row's padding columns keep the share of them its masks keep. The
  # outputs and their gradients are the full window's where the padding keys are alike.
  maxlen = 16
  config = make_config(mode, maxlen=maxlen, mask_padding_keys=False, dropout=0.4,
                       deterministic=False)
  assert config.trims_in_training == (mode != 'rotary')
  lengths = [3, 7, 1, 5]  # a window of 8 keeps a padding column in every row
  inputs = jnp.array([[0] * (maxlen - n) + list(range(2, 2 + n)) for n in lengths], jnp.int32)
  variables = _perturbed(init(config, inputs))
  model = Encoder(config)
  real = np.asarray(inputs[:, -8:] != 0)

  def outputs_and_grads(window_BxT):
    def real_outputs(params):
      hidden = model.apply({'params': params}, window_BxT, rngs={'dropout': jax.random.key(5)})
      return hidden[:, -8:][real]
    out = real_outputs(variables['params'])
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(real_outputs(p))))(variables['params'])
    return out, grads

  (cut, cut_grads), (full, full_grads) = map(outputs_and_grads, (inputs[:, -8:], inputs))
  same = np.allclose(cut, full, rtol=1e-5, atol=1e-5)
  assert same == (mode != 'rotary')
  if same:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 cut_grads, full_grads)


@pytest.mark.parametrize('mode', POSITION_MODES)
def test_every_weight_gradient_is_one_product_of_rows(mode):
  # Products with parameters (projections, feed-forward, PKA kernels on the logits, CoPE's
  # query and table) take their inputs as rows, so that each weight's gradient contracts one
  # axis of two matrices: from B×T×D inputs it contracts two, and XLA on CPU first copies
  # the input transposed (attention.dot_rows). Attention's own products keep a batch axis.
  config = make_config(mode, num_heads=1, dropout=0.3, deterministic=False)  # as in training
  params = init(config)

  def loss(params):
    hidden = Encoder(config).apply(params, INPUTS, rngs={'dropout': jax.random.key(1)})
    return jnp.sum(hidden ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
  unbatched = [eqn for eqn in jaxprs.equations(jaxpr) if eqn.primitive.name == 'dot_general'
               and not eqn.params['dimension_numbers'][1][0]]
  # Forward, input gradient and weight gradient of the 4 projections and 2 feed-forward
  # layers of each block, at least.
  assert len(unbatched) >= 3 * 6 * config.num_blocks
  assert all(var.aval.ndim == 2 for eqn in unbatched for var in eqn.invars), [
      [var.aval.shape for var in eqn.invars] for eqn in unbatched]


def test_a_window_wider_than_maxlen_is_refused():
  config = make_config('none')
  with pytest.raises(ValueError, match='at most maxlen = 6'):
    Encoder(config).apply(init(config), jnp.ones((1, T + 1), jnp.int32))


@pytest.mark.parametrize('mode', POSITION_MODES)
def test_jit_equals_no_jit(mode):
  config = make_config(mode)
  variables = init(config)
  apply = lambda v, x: Encoder(config).apply(v, x)
  np.testing.assert_allclose(jax.jit(apply)(variables, INPUTS), apply(variables, INPUTS),
                             rtol=1e-5, atol=1e-5)


def test_dropout_is_active_only_in_training():
  config = make_config('kernel', dropout=0.5, deterministic=False)
  variables = init(config)
  apply = lambda key: Encoder(config).apply(variables, INPUTS, rngs={'dropout': key})
  assert not np.allclose(apply(jax.random.key(1)), apply(jax.random.key(2)))


def test_parameter_count_is_exact():
  config = make_config('kernel')
  params = init(config)['params']
  # item table (N + 1) * D = 21 * 8 = 168; final LayerNorm 2D = 16.
  # Per block: q, k, v, out dense 4 * (D*D + D) = 288; ffn 2 * (D*D + D) = 144;
  #   two LayerNorms 4D = 32; own Toeplitz tail T - 1 = 5  ->  469.
  # Shared full kernel T * T = 36.  Total: 168 + 16 + 2 * 469 + 36 = 1158.
  assert sum(x.size for x in jax.tree.leaves(params)) == 1158
  # No positions: 168 + 16 + 2 * 464 = 1112. SASRec adds a T * D = 48 table, ALL-APE one per
  # block (2 * 48). CoPE, per block: a T * head_dim = 6 * 4 = 24 position table and the query's
  # Linear(head_dim, head_dim) = 4 * 4 + 4 = 20, 44 in all (2 * 44 = 88).
  counts = {m: sum(x.size for x in jax.tree.leaves(init(make_config(m))['params']))
            for m in ('none', 'absolute', 'absolute_all', 'contextual')}
  assert counts == {'none': 1112, 'absolute': 1160, 'absolute_all': 1208, 'contextual': 1200}


@pytest.mark.parametrize(
    'mode,overrides',
    [(m, {}) for m in POSITION_MODES] + [('kernel', o) for o in KERNEL_LAYOUTS])
def test_scoring_the_newest_position_alone_equals_the_full_forward(mode, overrides):
  # The last block queries only the newest position; keys and values still cover the window.
  config = make_config(mode, **overrides)
  variables = init(config)
  model = Encoder(config)
  full = model.apply(variables, INPUTS)
  last = model.apply(variables, INPUTS, last_only=True)
  chex.assert_shape(last, (2, 1, D))
  np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
  table = variables['params']['item_emb']['embedding']
  np.testing.assert_allclose(model.apply(variables, INPUTS, method=Encoder.score_last),
                             full[:, -1] @ table.T, rtol=1e-5, atol=1e-5)


def test_fused_attention_in_training_with_dropout_falls_back_to_the_plain_path():
  # jax.nn.dot_product_attention has no dropout on the attention weights.
  config = make_config('kernel', dropout=0.5, deterministic=False, attention_impl='xla')
  variables = init(config)
  apply = lambda key: Encoder(config).apply(variables, INPUTS, rngs={'dropout': key})
  chex.assert_tree_all_finite(apply(jax.random.key(1)))
  eval_config = dataclasses.replace(config, deterministic=True)
  plain = dataclasses.replace(eval_config, attention_impl='plain')
  np.testing.assert_allclose(Encoder(eval_config).apply(variables, INPUTS),
                             Encoder(plain).apply(variables, INPUTS), rtol=1e-5, atol=1e-5)


def test_bfloat16_activations_keep_float32_parameters_and_track_float32():
  config = make_config('kernel')
  variables = init(config)
  half = dataclasses.replace(config, dtype='bfloat16')
  assert {x.dtype for x in jax.tree.leaves(init(half)['params'])} == {jnp.dtype(jnp.float32)}
  hidden = Encoder(half).apply(variables, INPUTS)
  assert hidden.dtype == jnp.bfloat16
  full = Encoder(config).apply(variables, INPUTS)
  # LayerNorm outputs of unit scale; bfloat16 keeps 8 bits of mantissa (~0.4% per rounding).
  np.testing.assert_allclose(np.asarray(hidden, np.float32), full, atol=0.1)
  scores = Encoder(half).apply(variables, INPUTS, method=Encoder.score_last)
  assert scores.dtype == jnp.float32
