"""Two local processes (simulated hosts) train, checkpoint and evaluate as one run."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

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

SCRIPT = HOST + r'''
config.max_epochs = 2
results = jobs.train(config, workdir)
print(json.dumps({'devices': jax.device_count(), 'test': results['test'],
                  'best_step': results['best_step']}))
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


def test_two_hosts_agree_on_everything(tmp_path):
  reports = two_hosts(SCRIPT, tmp_path)
  assert reports[0]['devices'] == 4
  assert reports[0] == reports[1]
  assert reports[0]['test']['num_steps'] > 0
  assert os.path.exists(tmp_path / 'run' / 'results.json')
  assert os.listdir(tmp_path / 'run' / 'checkpoints')


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


def test_the_command_on_two_processes_gets_the_single_process_metrics(tmp_path):
  # Two processes of two CPU devices each form the same (data 4) mesh as one process of four.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  common = ['--config=configs/test.py', '--config.max_epochs=2',
            f'--config.data_dir={tmp_path / "data"}']

  def launch(workdir, devices, *extra):
    env = {**os.environ, 'JAX_NUM_CPU_DEVICES': str(devices)}
    return subprocess.Popen([sys.executable, '-m', 'pka_jax.main', *common,
                             f'--workdir={workdir}', *extra], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  single = launch(tmp_path / 'single', 4)
  single_out, single_err = single.communicate(timeout=300)
  assert single.returncode == 0, single_err[-3000:]
  address = f'localhost:{free_port()}'
  hosts = [launch(tmp_path / 'multi', 2, f'--coordinator_address={address}',
                  '--num_processes=2', f'--process_id={i}') for i in range(2)]
  outputs = [host.communicate(timeout=300) for host in hosts]
  for host, (_, stderr) in zip(hosts, outputs):
    assert host.returncode == 0, stderr[-3000:]
  # Every host logs its own view once; only process 0 prints the results.
  for i, (_, stderr) in enumerate(outputs):
    assert re.search(rf'process {i} of 2: 2 local cpu device\(s\) \[\d+, \d+\] of 4', stderr)
  assert 'pka ' in outputs[0][0] and 'pka ' not in outputs[1][0]
  results = [json.loads((tmp_path / name / 'results.json').read_text())
             for name in ('single', 'multi')]
  assert results[1]['best_step'] == results[0]['best_step']
  for part in ('valid', 'test'):
    assert results[1][part] == pytest.approx(results[0][part], abs=1e-6)
