"""One device and eight run the same program: same losses, same parameters, same metrics.

Both in this process: of the eight CPU devices the tests have (conftest), the first alone,
then all eight, data-parallel."""

import jax
import numpy as np

from configs import test as test_config
from pka_jax.training.loop import Trainer


def run_with(devices: int, tmp_path) -> dict:
  config = test_config.get_config()
  config.dropout = 0.0  # dropout bits may depend on the sharding; the arithmetic must not
  config.data_dir = str(tmp_path / 'data')
  run = Trainer.create(config, str(tmp_path / f'run{devices}'), devices=jax.devices()[:devices])
  losses = []
  for batch in run.inputs.epoch(0):
    run.state, metrics = run.placement.step_fn(run.state, run.placement.shard_batch(batch),
                                               run.dropout_rng, run.config.learning_rate)
    losses.append(float(metrics['loss_sum'] / metrics['loss_count']))
  valid = run.evaluate('valid')
  leaves = jax.tree_util.tree_flatten_with_path(run.state.params)[0]
  return {'devices': run.placement.mesh.size, 'eval_devices': run.placement.eval_mesh.size,
          'losses': losses, 'ndcg': valid['ndcg@10'],
          'params': {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}}


def test_one_device_and_eight_devices_agree(tmp_path):
  one, eight = run_with(1, tmp_path), run_with(8, tmp_path)
  assert (one['devices'], eight['devices']) == (1, 8)
  assert (one['eval_devices'], eight['eval_devices']) == (1, 8)
  assert len(one['losses']) > 1
  np.testing.assert_allclose(eight['losses'], one['losses'], rtol=1e-4)
  assert one['params'].keys() == eight['params'].keys()
  for path, leaf in one['params'].items():
    # atol: the key biases' true gradient is zero (softmax ignores a constant added to a row
    # of logits), so they hold only rounding noise, which Adam scales up to ~1e-4.
    atol = 1e-3 if "['key']['bias']" in path else 1e-6
    np.testing.assert_allclose(eight['params'][path], leaf, rtol=1e-4, atol=atol, err_msg=path)
  assert abs(eight['ndcg'] - one['ndcg']) < 1e-3
