"""Preemption through the command line: SIGTERM in training and in validation, each saved and
resumed by the same command to the uninterrupted run's end."""

import jax
from jax.experimental import multihost_utils
import pytest

import fault_runs
from fault_runs import run_main
from pka_jax.training import checkpoint
from pka_jax.training import faults


def assert_preempted_at(result, step, workdir):
  assert result.returncode == faults.PREEMPTED_EXIT_STATUS == 143, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert (f'preempted: saved step {step} in {checkpoint.directory(str(workdir))}; run the '
          'same command again to resume') in result.stderr.splitlines()
  assert checkpoint.manager(str(workdir), read_only=True).latest_step() == step


def test_preempted_in_training_then_in_validation_the_command_ends_as_if_uninterrupted(
    tmp_path, once_per_run):
  once, data = fault_runs.uninterrupted(once_per_run)
  workdir = tmp_path / 'run'
  # SIGTERM in the 5th step (mid-epoch 1): saved at that step boundary.
  assert_preempted_at(run_main(workdir, data, term_at='step:5'), 5, workdir)
  # Resumed, the run ends epoch 1 at step 6; SIGTERM in its validation's second batch: the
  # epoch's training is saved and its validation is still to do.
  resumed = run_main(workdir, data, '--verbosity=0', term_at='eval_batch:2')
  assert 'Resumed from step 5 ' in resumed.stderr
  assert_preempted_at(resumed, fault_runs.STEPS_PER_EPOCH, workdir)
  # The rerun validates epoch 1 without training it again, and goes on to the end.
  finished = run_main(workdir, data, '--verbosity=0')
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert f'Resumed from step {fault_runs.STEPS_PER_EPOCH} (epoch 1 done)' in finished.stderr
  fault_runs.assert_same_end(workdir, once, data)
  fault_runs.assert_each_record_once(workdir)


def test_a_failing_preemption_sync_between_hosts_is_an_error(monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)

  def no_sync(step):
    raise RuntimeError('Preemption sync manager has not been initialized')

  monkeypatch.setattr(multihost_utils, 'reached_preemption_sync_point', no_sync)
  with pytest.raises(faults.PreemptionSyncError, match='at step 3 .*not been initialized'):
    faults.PreemptionWatch().reached(3)
