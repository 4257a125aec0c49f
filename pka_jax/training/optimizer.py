"""The train state: parameters and Adam, whose update is skipped where a gradient is not
finite (the loop then stops the run). The learning rate is not part of it: the train step
takes it as an input, so that runs at several rates (the trials of a search) share one
compiled program."""

from __future__ import annotations

import functools

from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from pka_jax import sharding
from pka_jax.model.encoder import Encoder


def create_train_state(model: Encoder, config, rng: jax.Array) -> train_state.TrainState:
  """Parameters for windows of `config.maxlen` and Adam's state (`config`: a ConfigDict or a
  placement.ProgramSpec)."""
  rows = sharding.data_shards(model.mesh)  # one per shard
  params = model.init(rng, jnp.zeros((rows, config.maxlen), jnp.int32))['params']
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=adam(config))


def adam(config) -> optax.GradientTransformationExtraArgs:
  """Adam with `config`'s decay rates, at the learning rate each update is given
  (`update(..., learning_rate=)`, a traced scalar in the train step): each update is
  `optax.adam(learning_rate)`'s, its state the same at any rate (so are checkpoints). With
  the rate an input rather than a constant, XLA may order the arithmetic differently:
  parameters agree with a constant rate's to rounding, and the README's synthetic run prints
  the same metrics to every digit. A step whose gradient is not finite leaves parameters
  and moments as they were; the loop then stops the run (the run never goes on past one)."""
  b1, b2 = config.adam_b1, config.adam_b2

  def at(learning_rate) -> optax.GradientTransformation:
    return apply_if_all_finite(optax.adam(learning_rate, b1=b1, b2=b2),
                               max_consecutive_errors=2**31 - 1)

  def update(updates, state, params=None, *, learning_rate, **unused_extra_args):
    return at(learning_rate).update(updates, state, params)

  return optax.GradientTransformationExtraArgs(at(1.0).init, update)


def apply_learning_rate(state: train_state.TrainState, grads, learning_rate: jax.Array
                        ) -> train_state.TrainState:
  """`state.apply_gradients`, Adam (`adam`) at `learning_rate`."""
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params,
                                       learning_rate=learning_rate)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state)


def all_finite(tree) -> jax.Array:
  """Whether every element of `tree` is finite: one reduction over the leaves laid end to
  end, and one per item-table leaf (a model-parallel mesh splits those by rows; laid end to
  end with the others they would be gathered)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  split = [leaf for path, leaf in leaves if sharding.is_item_table(path)]
  whole = [jnp.ravel(leaf) for path, leaf in leaves if not sharding.is_item_table(path)]
  checks = [jnp.isfinite(leaf).all() for leaf in split]
  if whole:
    checks.append(jnp.isfinite(jnp.concatenate(whole)).all())
  return functools.reduce(jnp.logical_and, checks, jnp.array(True))


def apply_if_all_finite(inner: optax.GradientTransformation, max_consecutive_errors: int
                        ) -> optax.GradientTransformation:
  """`optax.apply_if_finite`, state and all (checkpoints are the same), with its finiteness
  test done once over every gradient (`all_finite`): optax reduces each leaf on its own,
  which on a GPU is a kernel a leaf, 70 of the 382 kernels of ML-1M's PKA step
  (experiments/kernels/gpu_kernels.py)."""
  wrapped = optax.apply_if_finite(inner, max_consecutive_errors)

  def update(updates, state, params=None):
    isfinite = all_finite(updates)
    notfinite_count = jnp.where(isfinite, jnp.zeros([], jnp.int32),
                                optax.safe_int32_increment(state.notfinite_count))
    updates, inner_state = jax.lax.cond(
        isfinite | (notfinite_count > max_consecutive_errors),
        lambda: inner.update(updates, state.inner_state, params),
        lambda: (jax.tree.map(jnp.zeros_like, updates), state.inner_state))
    total_notfinite = jnp.where(isfinite, state.total_notfinite,
                                optax.safe_int32_increment(state.total_notfinite))
    return updates, optax.ApplyIfFiniteState(notfinite_count, isfinite, total_notfinite,
                                             inner_state)

  return optax.GradientTransformation(wrapped.init, update)
