"""One device and eight run the same program: same losses, same parameters, same metrics."""

import json
import os
import subprocess
import sys

from ml_collections import ConfigDict
import numpy as np

from pka_jax import sharding

SCRIPT = r'''
import json, sys
import jax
jax.config.update('jax_num_cpu_devices', int(sys.argv[1]))
import numpy as np
from configs import test
from pka_jax import train
config = test.get_config()
config.dropout = 0.0  # dropout bits may depend on the sharding; the arithmetic must not
config.data_dir = sys.argv[2]
run = train.Run(config, sys.argv[3])
losses = []
for batch in run.inputs.epoch(0):
  run.state, metrics = run.step_fn(run.state, run._global_batch(batch), run.dropout_rng)
  losses.append(float(metrics['loss_sum'] / metrics['loss_count']))
valid = run.evaluate('valid')
leaves = jax.tree_util.tree_flatten_with_path(run.state.params)[0]
np.savez(sys.argv[3] + '.npz', **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
print(json.dumps({'devices': jax.device_count(), 'losses': losses, 'ndcg': valid['ndcg@10']}))
'''


def run_with(devices: int, tmp_path) -> dict:
  workdir = tmp_path / f'run{devices}'
  result = subprocess.run(
      [sys.executable, '-c', SCRIPT, str(devices), str(tmp_path / 'data'), str(workdir)],
      capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'xla_cache')})
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  report['params'] = dict(np.load(str(workdir) + '.npz'))
  return report


def test_one_device_and_eight_devices_agree(tmp_path):
  one, eight = run_with(1, tmp_path), run_with(8, tmp_path)
  assert (one['devices'], eight['devices']) == (1, 8)
  assert len(one['losses']) > 1
  np.testing.assert_allclose(eight['losses'], one['losses'], rtol=1e-4)
  assert one['params'].keys() == eight['params'].keys()
  for path, leaf in one['params'].items():
    # atol: the key biases' true gradient is zero (softmax ignores a constant added to a row
    # of logits), so they hold only rounding noise, which Adam scales up to ~1e-4.
    atol = 1e-3 if "['key']['bias']" in path else 1e-6
    np.testing.assert_allclose(eight['params'][path], leaf, rtol=1e-4, atol=atol, err_msg=path)
  assert abs(eight['ndcg'] - one['ndcg']) < 1e-3


def test_a_cpu_is_split_into_the_most_devices_that_divide_the_batches():
  def config(**fields):
    return ConfigDict({'batch_size': 256, 'eval_batch_size': 512, 'mesh_model': 1,
                       'microbatches': 0, **fields})

  assert sharding.cpu_devices_for([config()], cores=2) == 2
  assert sharding.cpu_devices_for([config()], cores=1) == 1
  # 96 and 100 share the divisors 1, 2 and 4.
  assert sharding.cpu_devices_for([config(batch_size=96, eval_batch_size=100)], cores=8) == 4
  # A grid: every run's batches; 200 = 8 x 25 is the one 16 does not divide.
  assert sharding.cpu_devices_for([config(), config(batch_size=200)], cores=16) == 8
  # 32 microbatches of 256 / 16 = 16 rows per device would not divide; of 256 / 8 they do.
  assert sharding.cpu_devices_for([config(microbatches=32)], cores=16) == 8
  assert sharding.cpu_devices_for([config(mesh_model=2)], cores=8) == 1
  assert sharding.cpu_devices_for([config(batch_size='many')], cores=4) == 1
