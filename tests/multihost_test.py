"""Two local processes (simulated hosts) train, checkpoint and evaluate as one run."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import test as test_config
import fault_runs
from pka_jax.training import checkpoint
from pka_jax.training import faults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The start of each host's script (`python -c`, arguments: coordinator, process id, data_dir,
# workdir): two CPU devices, the test config.
HOST = r'''
import json, sys
import jax
jax.config.update('jax_num_cpu_devices', 2)
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from configs import test
from pka_jax import jobs
from pka_jax.training.loop import Trainer
config = test.get_config()
config.data_dir, workdir = sys.argv[3], sys.argv[4]
'''

def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def two_hosts(script: str, tmp_path) -> list:
  """Runs `script` as two hosts of one run; the JSON each printed last."""
  address = f'localhost:{free_port()}'
  hosts = [subprocess.Popen(
      [sys.executable, '-c', script, address, str(i), str(tmp_path / 'data'),
       str(tmp_path / 'run')], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [host.communicate(timeout=300) for host in hosts]
  for host, (_, stderr) in zip(hosts, outputs):
    assert host.returncode == 0, stderr[-3000:]
  return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]


SKIPPING_SCRIPT = HOST + r'''
import orbax.checkpoint as ocp
config.max_epochs, config.patience = 3, 100
config.checkpoint_interval_s = 0  # only the save in flight decides
ndcg, saved, evaluate, save = {1: 0.3, 2: 0.2, 3: 0.1}, [], Trainer.evaluate, Trainer.save
Trainer.evaluate = lambda self, part: (
    {**evaluate(self, part), 'ndcg@10': ndcg[self.progress.epoch]} if part == 'valid'
    else evaluate(self, part))
Trainer.save = lambda self, metrics=None: (
    saved.append(self.progress.epoch) if metrics else None, save(self, metrics))
# Only the primary host's answer counts: here it says a save is still being written.
busy = jax.process_index() == 0
ocp.CheckpointManager.is_saving_in_progress = lambda self: busy
jobs.train(config, workdir)
print(json.dumps(saved))
'''


def test_two_hosts_skip_the_same_saves(tmp_path):
  # Epoch 2 is neither the best nor the last: its save waits for no other, and the primary
  # host's view decides for both (a save one host skipped would leave the other waiting).
  assert two_hosts(SKIPPING_SCRIPT, tmp_path) == [[1, 3]] * 2


def test_the_command_on_two_processes_preempted_and_killed_ends_as_one_process(tmp_path):
  # Two processes of two CPU devices each form the same (data 4) mesh as one process of four.
  common = ['--config=configs/test.py', '--config.max_epochs=2', '--verbosity=0',
            '--config.checkpoint_every_steps=4', f'--config.data_dir={tmp_path / "data"}']

  def launch(workdir, devices, *extra, fault=None):
    env = {**os.environ, 'JAX_NUM_CPU_DEVICES': str(devices), **(fault or {})}
    return subprocess.Popen([sys.executable, '-m', 'pka_jax.main', *common,
                             f'--workdir={workdir}', *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def two_processes(faults_by_host=(None, None)):
    address = f'localhost:{free_port()}'
    hosts = [launch(tmp_path / 'multi', 2, f'--coordinator_address={address}',
                    '--num_processes=2', f'--process_id={i}', fault=fault)
             for i, fault in enumerate(faults_by_host)]
    return hosts, [host.communicate(timeout=300) for host in hosts]

  single = launch(tmp_path / 'single', 4)
  _, single_err = single.communicate(timeout=300)
  assert single.returncode == 0, single_err[-3000:]
  assert re.search(r'process 0 of 1: 4 local cpu device\(s\) \[0, 1, 2, 3\] of 4', single_err)

  # SIGTERM to the second process only, in its third step: the hosts agree on a step, both
  # save it and exit for a restart.
  hosts, outputs = two_processes((None, {faults._TERM_AT: 'step:3'}))  # pylint: disable=protected-access
  saved = []
  for host, (_, stderr) in zip(hosts, outputs):
    assert host.returncode == faults.PREEMPTED_EXIT_STATUS, stderr[-3000:]
    saved += re.findall(r'^preempted: saved step (\d+) in .*; run the same command again to '
                        r'resume$', stderr, re.MULTILINE)
  assert len(saved) == 2 and saved[0] == saved[1] and int(saved[0]) >= 3, saved
  manager = checkpoint.manager(str(tmp_path / 'multi'), read_only=True)
  assert manager.latest_step() == int(saved[0])

  # Rerun, then both killed in their fifth step, in the second epoch.
  die = {faults._DIE_AT: 'step:5'}  # pylint: disable=protected-access
  hosts, outputs = two_processes((die, die))
  for host, (_, stderr) in zip(hosts, outputs):
    assert host.returncode != 0
    assert f'Resumed from step {saved[0]} ' in stderr, stderr[-3000:]

  # The same two commands again finish the run as the one process did.
  hosts, outputs = two_processes()
  for i, (host, (_, stderr)) in enumerate(zip(hosts, outputs)):
    assert host.returncode == 0, stderr[-3000:]
    # Every host logs its own view once; only process 0 prints the results.
    assert re.search(rf'process {i} of 2: 2 local cpu device\(s\) \[\d+, \d+\] of 4', stderr)
    resumed = re.findall(r'Resumed from step (\d+) ', stderr)
    assert len(resumed) == 1 and int(resumed[0]) >= int(saved[0]), stderr[-3000:]
  assert 'pka ' in outputs[0][0] and 'pka ' not in outputs[1][0]
  results = [json.loads((tmp_path / name / 'results.json').read_text())
             for name in ('single', 'multi')]
  assert results[1]['best_step'] == results[0]['best_step']
  # Two processes reduce across hosts in another order than one does: equal to float32's
  # rounding, not bit for bit.
  for part in ('valid', 'test'):
    assert results[1][part] == pytest.approx(results[0][part], abs=1e-6)
  single_params, multi_params = (fault_runs.latest_state(tmp_path / name, tmp_path / 'data')[1]
                                 for name in ('single', 'multi'))
  steps = 2 * 6  # two epochs of 6 steps
  for (path, a), (_, b) in zip(single_params, multi_params, strict=True):
    name = jax.tree_util.keystr(path)
    if name.endswith("['key']['bias']"):
      # Its gradient is zero in exact arithmetic (it shifts every logit of a query's row
      # alike), so Adam's steps on it follow rounding, whichever order it comes in: only
      # their bound holds, a learning rate a step from its start at zero.
      bound = steps * test_config.get_config().learning_rate
      assert np.abs(a).max() <= bound and np.abs(b).max() <= bound, name
      continue
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)

