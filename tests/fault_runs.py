"""What the fault tests share: the command they interrupt, a fault injected at a chosen point,
the uninterrupted run to end equal to, and how to read a run's end state."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from configs import test as test_config
from pka_jax.training import faults
from pka_jax.training.loop import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 epochs of 6 steps; a mid-epoch checkpoint every 4 steps (steps 4, 8, 16, 20 mid-epoch;
# 12 and 24 also end an epoch).
FLAGS = ['--config=configs/test.py', '--config.max_epochs=4', '--config.patience=100',
         '--config.checkpoint_every_steps=4']
STEPS_PER_EPOCH, EPOCHS = 6, 4


def command(workdir, data_dir, *extra):
  return [sys.executable, '-m', 'pka_jax.main', *FLAGS, f'--workdir={workdir}',
          f'--config.data_dir={data_dir}', *extra]


def run_main(workdir, data_dir, *extra, die_at=None, term_at=None, prelude=None,
             timeout=300):
  """The command, SIGKILLed (`die_at`) or sent SIGTERM (`term_at`) at a fault point of
  pka_jax.training.faults ('step:5': the 5th step), or run after `prelude`, Python source
  that patches a library (the command then runs in the same interpreter)."""
  env = dict(os.environ)
  if die_at:
    env[faults._DIE_AT] = die_at  # pylint: disable=protected-access
  if term_at:
    env[faults._TERM_AT] = term_at  # pylint: disable=protected-access
  args = command(workdir, data_dir, *extra)
  if prelude is not None:
    args = [sys.executable, '-c', prelude + _RUN_MAIN, *args[3:]]
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


_RUN_MAIN = '''
import runpy, sys
sys.argv[0] = 'pka_jax.main'
runpy.run_module('pka_jax.main', run_name='__main__', alter_sys=True)
'''


def uninterrupted(once_per_run):
  """(workdir, data_dir) of the command run once without faults, shared by the test run."""
  with once_per_run('uninterrupted_fault_run') as (root, build):
    workdir, data_dir = root / 'once', root / 'data'
    if build:
      result = run_main(workdir, data_dir)
      assert result.returncode == 0, result.stderr[-3000:]
  return workdir, data_dir


def latest_state(workdir, data_dir):
  """The latest checkpoint's step and parameters (leaf by leaf), restored as a run would."""
  config = test_config.get_config()
  config.data_dir = str(data_dir)
  run = Trainer.create(config, str(workdir))
  assert run.restore_latest()
  params = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, run.state.params))[0]
  step = int(run.state.step)
  run.checkpoints.close()
  return step, params


def final_state(workdir, data_dir):
  """Parameters of the latest checkpoint (leaf by leaf) and the results."""
  _, params = latest_state(workdir, data_dir)
  with open(os.path.join(workdir, 'results.json')) as f:
    return params, json.load(f)


def assert_same_end(workdir, reference, data_dir):
  """The run in `workdir` ended with the reference's results and parameters, exactly."""
  (params, results), (params_ref, results_ref) = (final_state(w, data_dir)
                                                  for w in (workdir, reference))
  assert results == results_ref  # test metrics, best step, epochs: exactly
  for (path, a), (_, b) in zip(params_ref, params, strict=True):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def records(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def assert_each_record_once(workdir):
  """Work done again after a fault is recorded once: train losses at increasing steps, and one
  validation record for each epoch."""
  lines = records(workdir)
  steps = [r['step'] for r in lines if 'train/loss' in r]
  assert steps == sorted(set(steps))
  epochs = [r['epoch'] for r in lines if 'valid/ndcg@10' in r]
  assert epochs == list(range(1, EPOCHS + 1)), epochs
