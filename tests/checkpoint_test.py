"""Which checkpoints survive (the latest, and the best by validation NDCG@10, earliest on ties),
and what a failing save leaves."""

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import test as test_config
from pka_jax import jobs
from pka_jax.training import checkpoint
from pka_jax.training.loop import Trainer


def save_steps(workdir, ndcg_by_step) -> list[int]:
  """Saves each `(step, NDCG@10)` (None: a save without metrics) in one manager, as one
  process would; returns the steps kept."""
  manager = checkpoint.manager(workdir)
  config = ml_collections.ConfigDict({'model': 'pka'})
  for step, ndcg in ndcg_by_step:
    checkpoint.save(manager, step, state={'w': np.full(2, step, np.float32)},
                    progress={'epoch': step}, config=config,
                    metrics=None if ndcg is None else {checkpoint.BEST_METRIC: ndcg})
  manager.wait_until_finished()
  steps = manager.all_steps()
  manager.close()
  return steps


def test_keeps_latest_and_earliest_best(tmp_path):
  steps = save_steps(str(tmp_path), [(1, 0.3), (2, 0.5), (3, 0.5), (4, 0.4), (5, None)])
  assert steps == [2, 5]
  manager = checkpoint.manager(str(tmp_path), read_only=True)
  state, progress = checkpoint.restore(manager, 2, {'w': np.zeros(2, np.float32)})
  np.testing.assert_array_equal(state['w'], [2, 2])
  assert progress == {'epoch': 2}
  assert checkpoint.restore_config(str(tmp_path)).model == 'pka'
  manager.close()


def test_a_resumed_run_keeps_the_best_saved_before_it(tmp_path):
  # Regression: orbax kept metrics in memory only, so a new process knew none for the steps
  # on disk and its first save deleted the best one.
  assert save_steps(str(tmp_path), [(1, 0.3), (2, 0.5), (3, 0.4)]) == [2, 3]
  assert save_steps(str(tmp_path), [(4, 0.2)]) == [2, 4]  # the next process


def test_a_save_may_be_skipped_while_another_is_written_or_soon_after(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'no_interval')
  # Step 1 first: a manager clears unfinished saves in a thread of its own (orbax's
  # cleanup_tmp_directories), which could remove another manager's save in progress.
  assert save_steps(workdir, [(1, 0.3)]) == [1]
  manager = checkpoint.manager(workdir)
  monkeypatch.setattr(ocp.CheckpointManager, 'is_saving_in_progress', lambda self: True)
  assert not manager.should_save(2)
  monkeypatch.setattr(ocp.CheckpointManager, 'is_saving_in_progress', lambda self: False)
  assert manager.should_save(2)
  manager.close()
  hourly = checkpoint.manager(workdir, interval_s=3600)
  assert not hourly.should_save(2)  # an hour has not passed since step 1
  hourly.close()


def test_a_failing_save_stops_the_run_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
  config = test_config.get_config()
  config.data_dir = str(tmp_path / 'data')
  real_save, saves = ocp.CheckpointManager.save, []

  def disk_full_at_the_second_save(self, step, *args, **kwargs):
    saves.append(step)
    if len(saves) == 2:
      raise OSError(28, 'No space left on device')
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', disk_full_at_the_second_save)
  workdir = str(tmp_path / 'run')
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'could not save the checkpoint of step \d+ .*No space left on device'):
    jobs.train(config, workdir)
  monkeypatch.undo()
  assert len(saves) == 2
  run = Trainer.create(config, workdir)
  assert run.restore_latest()
  assert int(run.state.step) == saves[0] and run.progress.epoch == 1
  assert run.progress.history[-1]['step'] == saves[0]


def test_a_state_orbax_wrote_in_replica_slices_restores_as_it_was(tmp_path):
  # Earlier versions let orbax cut each replicated array into one slice per device; one
  # process now writes them whole. A workdir of theirs restores the same values.
  replicated = NamedSharding(jax.make_mesh((8,), ('data',)), P())
  rng = np.random.default_rng(0)
  state = {'table': rng.standard_normal((64, 16), np.float32),
           'kernel': rng.standard_normal((8, 8), np.float32), 'step': np.int32(7)}
  on_devices = jax.device_put(state, replicated)
  config = ml_collections.ConfigDict({'model': 'pka'})
  manager = checkpoint.manager(str(tmp_path))  # registers the whole-array writer
  try:
    checkpoint.use_array_handler(replica_parallel=True)  # orbax's default
    checkpoint.save(manager, 1, state=on_devices, progress={'epoch': 1}, config=config)
    checkpoint.wait(manager)
  finally:
    checkpoint.use_array_handler(replica_parallel=False)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        on_devices)
  restored, _ = checkpoint.restore(checkpoint.manager(str(tmp_path), read_only=True), 1, target)
  for name, value in state.items():
    np.testing.assert_array_equal(restored[name], value, err_msg=name)
    assert restored[name].sharding == replicated, name
