"""Which checkpoints survive: the latest, and the best by validation NDCG@10 (earliest on ties)."""

import ml_collections
import numpy as np

from pka_jax import checkpoint


def test_keeps_latest_and_earliest_best(tmp_path):
  manager = checkpoint.manager(str(tmp_path))
  config = ml_collections.ConfigDict({'model': 'pka'})
  for step, ndcg in [(1, 0.3), (2, 0.5), (3, 0.5), (4, 0.4), (5, None)]:
    metrics = None if ndcg is None else {checkpoint.BEST_METRIC: ndcg}
    checkpoint.save(manager, step, state={'w': np.full(2, step, np.float32)},
                    progress={'epoch': step}, config=config, metrics=metrics)
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 5]
  state, progress = checkpoint.restore(manager, 2, {'w': np.zeros(2, np.float32)})
  np.testing.assert_array_equal(state['w'], [2, 2])
  assert progress == {'epoch': 2}
  assert checkpoint.restore_config(str(tmp_path)).model == 'pka'
  manager.close()
