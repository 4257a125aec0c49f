"""A disk that fills during a checkpoint's background write: the command stops with one line,
the earlier checkpoint restores, and the rerun discards the partial save and ends as if
uninterrupted."""

import glob
import os
import shutil

import fault_runs
from fault_runs import run_main
from pka_jax.training import checkpoint

# Orbax writes a checkpoint's JSON items (the progress, the config) in its background commit
# thread. The first of step 8's writes half a file and finds the disk full: the save fails
# after the run has moved on, and the run learns of it when it next waits for its saves (at
# step 12).
DISK_FULL_IN_THE_BACKGROUND = '''
import asyncio
import errno
from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler

failed = []
write = json_handler.JsonCheckpointHandler._save_fn

async def disk_full_in_step_8(self, item, directory):
  if '/8.orbax-checkpoint-tmp' in str(directory):
    if not failed:
      failed.append(directory)
      (directory / 'metadata').write_text('{"half": ')
      raise OSError(errno.ENOSPC, 'No space left on device', str(directory / 'metadata'))
    await asyncio.sleep(1.0)  # the save's other item is still being written when it fails
  return await write(self, item, directory)

json_handler.JsonCheckpointHandler._save_fn = disk_full_in_step_8
'''
FAILED_STEP, PREVIOUS_STEP = 8, 6


def partial_saves(workdir):
  return glob.glob(os.path.join(checkpoint.directory(str(workdir)), '*.orbax-checkpoint-tmp*'))


def test_a_save_failing_in_the_background_stops_the_run_and_the_rerun_recovers(
    tmp_path, once_per_run):
  once, data = fault_runs.uninterrupted(once_per_run)
  workdir = tmp_path / 'run'
  failed = run_main(workdir, data, prelude=DISK_FULL_IN_THE_BACKGROUND)
  assert failed.returncode == 1, failed.stderr[-3000:]
  assert 'Traceback' not in failed.stderr, failed.stderr[-3000:]
  lines = failed.stderr.strip().splitlines()
  assert lines[-1].startswith(
      f'error: could not finish saving a checkpoint in {checkpoint.directory(str(workdir))}: ')
  assert 'No space left on device' in lines[-1], lines[-1]
  assert [os.path.basename(p).split('.')[0] for p in partial_saves(workdir)] == [
      str(FAILED_STEP)]
  # The step saved before the failure is complete and restores (in a copy: the partial save
  # stays for the rerun to discard).
  shutil.copytree(workdir, tmp_path / 'copy')
  assert fault_runs.latest_state(tmp_path / 'copy', data)[0] == PREVIOUS_STEP

  rerun = run_main(workdir, data, '--verbosity=0')
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'Discarding 1 unfinished checkpoint(s)' in rerun.stderr
  assert f'Resumed from step {PREVIOUS_STEP} ' in rerun.stderr
  assert not partial_saves(workdir)
  fault_runs.assert_same_end(workdir, once, data)
  fault_runs.assert_each_record_once(workdir)
