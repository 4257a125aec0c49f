"""Faults through the command line: kills at random moments, preemption, non-finite losses."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import test as test_config
from pka_jax.training import checkpoint
from pka_jax.training import faults
from pka_jax.training.loop import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 epochs of 6 steps; a mid-epoch checkpoint every 4 steps (steps 4, 8, 16, 20 mid-epoch;
# 12 and 24 also end an epoch).
FLAGS = ['--config=configs/test.py', '--config.max_epochs=4', '--config.patience=100',
         '--config.checkpoint_every_steps=4']


def command(workdir, data_dir, *extra):
  return [sys.executable, '-m', 'pka_jax.main', *FLAGS, f'--workdir={workdir}',
          f'--config.data_dir={data_dir}', *extra]


def environment(**extra):
  return {**os.environ, **extra}


def run_main(tmp_path, workdir, *extra, die_at=None, timeout=300):
  env = environment(**({faults._DIE_AT: die_at} if die_at else {}))
  return subprocess.run(command(workdir, tmp_path / 'data', *extra), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def final_state(workdir):
  """Parameters of the latest checkpoint (leaf by leaf) and the test metrics."""
  config = test_config.get_config()
  config.data_dir = os.path.join(os.path.dirname(workdir), 'data')
  run = Trainer.create(config, str(workdir))
  assert run.restore_latest()
  params = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, run.state.params))[0]
  run.checkpoints.close()
  with open(os.path.join(workdir, 'results.json')) as f:
    return params, json.load(f)


def unfinished_checkpoints(workdir):
  return glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*'))


def test_killed_at_random_moments_the_rerun_command_gives_the_uninterrupted_run(tmp_path):
  once = tmp_path / 'once'
  assert run_main(tmp_path, once).returncode == 0
  rng = random.Random(7)
  # Seeded random steps, plus a kill inside a checkpoint save and one inside validation.
  kill_points = [f'step:{rng.randint(1, 9)}', 'save:2', 'eval_batch:2',
                 f'step:{rng.randint(1, 9)}']
  twice = tmp_path / 'twice'
  for point in kill_points:
    killed = run_main(tmp_path, twice, die_at=point)
    assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
    if point.startswith('save'):
      assert unfinished_checkpoints(twice), 'the kill came after the save had finished'
  resumed = run_main(tmp_path, twice)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert not unfinished_checkpoints(twice)

  (params_once, results_once), (params_twice, results_twice) = map(final_state, (once, twice))
  assert results_twice == results_once  # test metrics, best step, epochs: exactly
  for (path, a), (_, b) in zip(params_once, params_twice, strict=True):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # Work done again after a kill is recorded once.
  steps = [json.loads(line)['step'] for line in open(twice / 'metrics.jsonl')
           if 'train/loss' in line]
  assert steps == sorted(set(steps))


def test_sigterm_saves_at_the_next_step_and_exits_for_a_restart(tmp_path):
  workdir = tmp_path / 'run'
  process = subprocess.Popen(
      command(workdir, tmp_path / 'data', '--config.max_epochs=1000'), cwd=ROOT,
      env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.monotonic() + 240
  while not (metrics.exists() and metrics.read_text().count('train/loss') >= 5):
    assert process.poll() is None and time.monotonic() < deadline
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == faults.PREEMPTED_EXIT_STATUS == 143
  last_line = stderr.strip().splitlines()[-1]
  assert last_line.startswith('preempted: saved step ') and 'same command again' in last_line
  saved_step = int(last_line.split('saved step ')[1].split()[0])
  manager = checkpoint.manager(str(workdir), read_only=True)
  assert manager.latest_step() == saved_step >= 10  # past the 5th logged step (every 2)
  assert 'Traceback' not in stderr


def test_a_non_finite_loss_stops_with_one_line_and_no_bad_checkpoint(tmp_path):
  workdir = tmp_path / 'run'
  # A learning rate of 1e30 sends the weights to ~1e30 at the first update: the attention
  # logits of the second step overflow.
  result = run_main(tmp_path, workdir, '--config.learning_rate=1e30',
                    '--config.checkpoint_every_steps=1')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('error: non-finite loss or gradient at step ')
  assert 'Last good checkpoint: step ' in last_line
  manager = checkpoint.manager(str(workdir), read_only=True)
  assert manager.all_steps()
  for step in manager.all_steps():
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    for leaf in jax.tree.leaves(restored.state):
      assert np.all(np.isfinite(np.asarray(leaf, dtype=np.float64))), step
