"""Two local processes (simulated hosts) train, checkpoint and evaluate as one run."""

import json
import os
import socket
import subprocess
import sys

SCRIPT = r'''
import json, sys
import jax
jax.config.update('jax_num_cpu_devices', 2)
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from configs import test
from pka_jax import train
config = test.get_config()
config.data_dir, config.max_epochs = sys.argv[3], 2
results = train.train_and_evaluate(config, sys.argv[4])
print(json.dumps({'devices': jax.device_count(), 'test': results['test'],
                  'best_step': results['best_step']}))
'''


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_hosts_agree_on_everything(tmp_path):
  address = f'localhost:{free_port()}'
  env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'xla_cache')}
  hosts = [subprocess.Popen(
      [sys.executable, '-c', SCRIPT, address, str(i), str(tmp_path / 'data'),
       str(tmp_path / 'run')], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
      for i in range(2)]
  outputs = [host.communicate(timeout=300) for host in hosts]
  for host, (_, stderr) in zip(hosts, outputs):
    assert host.returncode == 0, stderr[-3000:]
  reports = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
  assert reports[0]['devices'] == 4
  assert reports[0] == reports[1]
  assert reports[0]['test']['num_steps'] > 0
  assert os.path.exists(tmp_path / 'run' / 'results.json')
  assert os.listdir(tmp_path / 'run' / 'checkpoints')
