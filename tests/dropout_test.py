"""Hashed dropout masks: the keep rate, independence between elements and between calls; in
the train step, masks drawn afresh every step and at every call site."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from pka_jax.model import dropout
from pka_jax.training import steps
from pka_jax.training.loop import Trainer

SHAPE = (64, 128, 128)  # 1,048,576 elements: a binomial standard error of about 0.0005
N = 64 * 128 * 128


def within_sigmas(fraction: float, p: float, n: int, sigmas: float = 5.0) -> bool:
  return abs(fraction - p) < sigmas * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize('impl', dropout.DROPOUT_IMPLS)
@pytest.mark.parametrize('rate', [0.1, 0.3, 0.5, 0.9])
def test_keep_fraction_is_one_minus_the_rate(impl, rate):
  keep = np.asarray(dropout.keep_mask(jax.random.key(1), rate, SHAPE, impl))
  assert within_sigmas(keep.mean(), 1 - rate, N)
  # Along every axis: no row, column or depth of the tensor is favoured.
  for axis in range(3):
    means = keep.mean(axis=tuple(a for a in range(3) if a != axis))
    count = N // SHAPE[axis]
    assert np.all(np.abs(means - (1 - rate)) < 6 * np.sqrt(rate * (1 - rate) / count)), axis


def test_neighbouring_elements_are_uncorrelated():
  bits = np.asarray(dropout.keep_mask(jax.random.key(2), 0.5, (N,))).astype(np.float64)
  centred = bits - bits.mean()
  for lag in (1, 2, 128, 128 * 128):
    correlation = (centred[:-lag] * centred[lag:]).mean() / centred.var()
    assert abs(correlation) < 5 / np.sqrt(N), lag


def test_two_calls_draw_independent_masks():
  rate = 0.3
  first, second = (np.asarray(dropout.keep_mask(key, rate, SHAPE))
                   for key in jax.random.split(jax.random.key(3)))
  both_kept = (first & second).mean()
  assert within_sigmas(both_kept, (1 - rate)**2, N)
  assert (first != second).any()


def test_module_scales_kept_values_and_is_the_identity_when_deterministic():
  x = jnp.ones((32, 64, 16))
  module = dropout.Dropout(rate=0.25, deterministic=False)
  out = np.asarray(module.apply({}, x, rngs={'dropout': jax.random.key(4)}))
  kept = out != 0
  np.testing.assert_allclose(out[kept], 1 / 0.75, rtol=1e-6)
  assert within_sigmas(kept.mean(), 0.75, x.size)
  same = dropout.Dropout(rate=0.25, deterministic=True).apply({}, x)
  np.testing.assert_array_equal(same, x)


def test_hash_is_a_bijection_of_the_index_for_a_fixed_seed():
  # Distinct indices give distinct bits (lowbias32 and the keyed rounds are invertible), so
  # a mask has no structure a smaller hash range could introduce.
  bits = np.asarray(dropout.hash_bits(jnp.array([7, 11], jnp.uint32), (1 << 20,)))
  assert len(np.unique(bits)) == len(bits)


def test_a_window_indexes_its_elements_in_the_whole_batch_at_full_width():
  # Rows 1 and 3 of a batch of 4, the last 3 of maxlen 5 positions, as attention weights
  # (B, H, Q, T): the index is numpy's flat index into the whole (4, 2, 5, 5) array.
  window = dropout.Window(maxlen=5, rows_B=jnp.array([1, 3]))
  index = np.asarray(window.index((2, 2, 3, 3), position_axes=(2, 3)))
  b, h, q, t = np.meshgrid([1, 3], [0, 1], [2, 3, 4], [2, 3, 4], indexing='ij')
  np.testing.assert_array_equal(index, np.ravel_multi_index((b, h, q, t), (4, 2, 5, 5)))
  # All rows at full width: the array's own flat index, so such masks are unchanged.
  whole = np.asarray(dropout.Window(maxlen=5).index((4, 5, 6), position_axes=(1,)))
  np.testing.assert_array_equal(whole, np.arange(4 * 5 * 6).reshape(4, 5, 6))


def test_a_microbatch_of_a_trimmed_batch_draws_the_whole_batchs_masks():
  module = dropout.Dropout(rate=0.5, deterministic=False)
  rng = {'dropout': jax.random.key(5)}
  x = jnp.ones((8, 16, 4))
  whole = np.asarray(module.apply({}, x, dropout.Window(maxlen=16), rngs=rng))
  # The third of four microbatches, split as microbatching.split_microbatches splits.
  rows = jnp.array([2, 6])
  part = np.asarray(module.apply({}, x[:2, -6:], dropout.Window(maxlen=16, rows_B=rows),
                                 rngs=rng))
  np.testing.assert_array_equal(part, whole[np.asarray(rows)][:, -6:])


# ---- in the train step: fresh masks every step, and at every call site ----

def trainer(tmp_path, name: str, **overrides) -> Trainer:
  config = test_config.get_config()
  config.data_dir = str(tmp_path / 'data')
  config.update(overrides)
  return Trainer.create(config, str(tmp_path / name))


def loss_at_step(run: Trainer, local_batch, step: int) -> float:
  """The loss the Trainer's step reports on `local_batch` from `run`'s parameters, with the
  state's step counter set to `step`: the loss is taken before the update, so two calls
  differ only in the step that keys the dropout masks."""
  # A copy each call: the step donates the state it is given.
  state = jax.tree.map(jnp.copy, run.state)
  state = state.replace(step=jnp.full_like(state.step, step))
  _, metrics = run.placement.train_on(state, local_batch, run.dropout_rng, run.config.learning_rate)
  return float(metrics['loss_sum'] / metrics['loss_count'])


# Both programs the Trainer runs: steps.train_step on the whole batch and
# steps.length_sorted_step on length-sorted microbatches; each keys dropout by the step itself.
@pytest.mark.parametrize('program, overrides', [
    ('whole batch', {'microbatches': 1, 'trim_windows': False}),
    ('length-sorted microbatches', {'microbatches': 4}),
])
def test_the_same_parameters_and_batch_lose_differently_at_the_next_step(
    tmp_path, program, overrides):
  # Dropout 0 once, on the whole batch: the counter then changes nothing.
  for rate in ((0.3, 0.0) if program == 'whole batch' else (0.3,)):
    run = trainer(tmp_path, f'dropout {rate}', dropout=rate, **overrides)
    assert run.placement.sorts_microbatches == (program == 'length-sorted microbatches')
    batch = next(iter(run.inputs.epoch(0)))
    first, second = (loss_at_step(run, batch, step) for step in (0, 1))
    if rate:
      # Other masks: at rate 0.3 on this tiny model the loss moves by about 0.1%.
      assert abs(first - second) > 1e-4 * abs(first), (first, second)
    else:
      assert first == second  # nothing else in the step depends on its counter


def dropout_masks_of_a_step(params, apply_fn, local_batch, rng) -> list[tuple[str, np.ndarray]]:
  """`(module path, keep-mask)` of every dropout call, in call order, as `steps.loss_sums`
  runs the model with the step's key `rng`. Each call site draws its key as it always does
  (one draw a call); the mask is that call's output on ones, and the model goes on with
  the very output the call would have given."""
  masks = []

  def record_masks(next_fun, args, kwargs, context):
    if not (isinstance(context.module, dropout.Dropout) and context.method_name == '__call__'):
      return next_fun(*args, **kwargs)
    x, *rest = args
    assert kwargs.get('stand_ins') is None  # the output is then the input times the mask
    scaled_keep = next_fun(jnp.ones_like(x), *rest, **kwargs)
    masks.append(('/'.join(context.module.scope.path), np.asarray(scaled_keep) != 0))
    return scaled_keep * x

  with nn.intercept_methods(record_masks):
    steps.loss_sums(params, apply_fn, local_batch, rng, 'ce')
  return masks


def test_dropout_sites_of_one_shape_draw_independent_masks(tmp_path):
  rate = 0.3
  run = trainer(tmp_path, 'run', dropout=rate, microbatches=1, trim_windows=False,
                attention_impl='plain', ffn_impl='xla')
  batch = run.placement.shard_batch(next(iter(run.inputs.epoch(0))))
  step_rng = jax.random.fold_in(run.dropout_rng, 0)  # as the step keys its first step
  masks = dropout_masks_of_a_step(run.state.params, run.state.apply_fn, batch, step_rng)
  # The embeddings', each block's two feed-forward calls (of one module) and each block's
  # attention weights'.
  assert [path for path, _ in masks] == [
      'embed_dropout', *[f'block_{i}/{site}' for i in range(2)
                         for site in ('attention/Dropout_0', 'Dropout_0', 'Dropout_0')]]
  by_shape = {}
  for index, (path, mask) in enumerate(masks):
    by_shape.setdefault(mask.shape, []).append((f'{index}: {path}', mask))
  assert sorted(len(sites) for sites in by_shape.values()) == [2, 5]
  # Independent masks agree where both keep or both drop: with probability r² + (1 - r)².
  # Over n elements the agreeing share is binomial: 5 standard deviations (n = 8,192 or
  # 16,384 here: under 0.03) hold it for every pair; identical masks, which sites sharing a
  # key would draw, agree on all of them.
  agree = rate**2 + (1 - rate)**2
  for sites in by_shape.values():
    for (name_a, a), (name_b, b) in itertools.combinations(sites, 2):
      agreement = float((a == b).mean())
      assert within_sigmas(agreement, agree, a.size), (name_a, name_b, agreement)
      assert not within_sigmas(1.0, agree, a.size)
