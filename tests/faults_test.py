"""Faults: kills at random moments through the command line, and non-finite steps."""

import collections
import glob
import os
import random
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
import fault_runs
from fault_runs import run_main
from pka_jax.training import checkpoint
from pka_jax.training import faults
from pka_jax.training import placement
from pka_jax.training import steps
from pka_jax.training.loop import Trainer


def unfinished_checkpoints(workdir):
  return glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*'))


def test_killed_at_random_moments_the_rerun_command_gives_the_uninterrupted_run(
    tmp_path, once_per_run):
  once, data = fault_runs.uninterrupted(once_per_run)
  rng = random.Random(7)
  # A seeded random step, a kill inside a checkpoint save and one inside validation.
  kill_points = [f'step:{rng.randint(1, 9)}', 'save:2', 'eval_batch:2']
  twice = tmp_path / 'twice'
  for point in kill_points:
    killed = run_main(twice, data, die_at=point)
    assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
    if point.startswith('save'):
      assert unfinished_checkpoints(twice), 'the kill came after the save had finished'
  resumed = run_main(twice, data)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert not unfinished_checkpoints(twice)
  fault_runs.assert_same_end(twice, once, data)
  fault_runs.assert_each_record_once(twice)


NAN_STEP = 5
# What optax.apply_if_finite records of a skipped step; Adam's own state, its count included,
# stays as it was.
SKIPPED_STEP_RECORD = ('notfinite_count', 'last_finite', 'total_notfinite')


@pytest.fixture
def nan_gradient_at_step_5(monkeypatch):
  """Every train step built while it is on makes step 5's gradient NaN (the step's state
  holds step 4 then)."""
  apply = steps._apply_summed_gradients  # pylint: disable=protected-access

  def poisoned(state, learning_rate, grads, total, count):
    at_step = state.step == NAN_STEP - 1
    grads = jax.tree.map(lambda g: jnp.where(at_step, jnp.nan, g), grads)
    return apply(state, learning_rate, grads, total, count)

  monkeypatch.setattr(steps, '_apply_summed_gradients', poisoned)
  # Built placements hold steps traced without the poison; none built with it is kept.
  monkeypatch.setattr(placement, '_BUILT', collections.OrderedDict())


def test_a_nan_at_step_k_stops_the_run_with_the_parameters_before_it(tmp_path,
                                                                     nan_gradient_at_step_5):
  config = test_config.get_config()
  config.data_dir = str(tmp_path / 'data')
  config.checkpoint_every_steps = 1
  workdir = str(tmp_path / 'run')
  trainer = Trainer.create(config, workdir)
  with pytest.raises(faults.NonFiniteLoss) as error:
    trainer.train_and_test()
  message = str(error.value)
  assert message.startswith(f'non-finite loss or gradient at step {NAN_STEP} ')
  manager = checkpoint.manager(workdir, read_only=True)
  assert manager.latest_step() == NAN_STEP - 1  # nothing after the fault was saved
  assert (f'Last good checkpoint: step {NAN_STEP - 1} in {checkpoint.directory(workdir)}'
          in message)
  # The step's update was skipped: parameters and Adam's moments are those of the last good
  # checkpoint, leaf by leaf, though the step counter moved on.
  assert int(trainer.state.step) == NAN_STEP
  assert not bool(trainer.state.opt_state.last_finite)
  before = Trainer.create(config, str(tmp_path / 'run'))
  assert before.restore_latest()
  compared = 0
  for name in ('params', 'opt_state'):
    after_leaves = jax.tree_util.tree_flatten_with_path(getattr(trainer.state, name))[0]
    before_leaves = jax.tree.leaves(getattr(before.state, name))
    for (path, after), expected in zip(after_leaves, before_leaves, strict=True):
      if getattr(path[-1], 'name', None) in SKIPPED_STEP_RECORD:
        continue
      np.testing.assert_array_equal(np.asarray(after), np.asarray(expected),
                                    err_msg=f'{name}{jax.tree_util.keystr(path)}')
      compared += 1
  assert compared > len(jax.tree.leaves(trainer.state.params))  # the moments were compared
  before.checkpoints.close()


def test_a_non_finite_loss_stops_the_command_with_one_line(tmp_path):
  workdir = tmp_path / 'run'
  # A learning rate of 1e30 sends the weights to ~1e30 at the first update: the attention
  # logits of the second step overflow.
  result = run_main(workdir, tmp_path / 'data', '--config.learning_rate=1e30',
                    '--config.checkpoint_every_steps=1')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('error: non-finite loss or gradient at step 2 ')
  manager = checkpoint.manager(str(workdir), read_only=True)
  assert manager.latest_step() == 1
  assert f'Last good checkpoint: step 1 in {checkpoint.directory(str(workdir))}' in last_line
