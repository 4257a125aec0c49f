"""The exported scorer, loaded by a process that cannot import flax or pka_jax, ranks like
pka_jax.recommend: same top-k, same scores."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pka_jax.serving import export
from pka_jax.serving import recommender as recommender_lib
import recommend_test


@pytest.fixture(scope='module')
def trained(trained_test_run):
  return trained_test_run


@pytest.fixture(scope='module')
def recommender(trained):
  return recommender_lib.Recommender.from_workdir(trained.workdir)

K = 7

# Run in a fresh interpreter: jax and numpy only; importing flax or pka_jax fails.
SERVE = textwrap.dedent('''
    import importlib.abc, json, sys

    class Blocker(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('flax', 'pka_jax', 'orbax', 'optax'):
          raise ImportError(f'{name} is blocked')

    sys.meta_path.insert(0, Blocker())
    for blocked in ('flax', 'pka_jax'):
      try:
        __import__(blocked)
        raise SystemExit(f'{blocked} imported')
      except ImportError:
        pass

    import jax
    import numpy as np

    out = sys.argv[1]
    with open(f'{out}/scorer.jax', 'rb') as f:
      scorer = jax.export.deserialize(f.read())
    item_ids = np.load(f'{out}/item_ids.npy')
    histories = np.load(sys.argv[2])
    results = {}
    for name, rows in (('batch', histories), ('one', histories[:1])):
      items, scores = scorer.call(rows)
      results[name] = {'items': np.asarray(items).tolist(), 'scores': np.asarray(scores).tolist(),
                       'raw': item_ids[np.asarray(items) - 1].tolist(),
                       'dtypes': [str(items.dtype), str(scores.dtype)]}
    print(json.dumps(results))
''')


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
  out = tmp_path_factory.mktemp('export') / 'scorer'
  result = subprocess.run(
      [sys.executable, '-m', 'pka_jax.export', f'--workdir={trained.workdir}', f'--out={out}',
       f'--k={K}'],
      cwd=tmp_path_factory.mktemp('cwd'), check=False, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  return out


def test_export_writes_the_contracts_files(exported, recommender):
  assert sorted(os.listdir(exported)) == ['item_ids.npy', 'meta.json', 'scorer.jax']
  np.testing.assert_array_equal(np.load(exported / 'item_ids.npy'), recommender.item_ids)
  meta = json.loads((exported / 'meta.json').read_text())
  assert (meta['k'], meta['maxlen'], meta['step']) == (K, recommender.maxlen, recommender.step)


def test_scorer_without_flax_or_pka_jax_ranks_like_recommend(trained, recommender, exported,
                                                             tmp_path):
  recent = [h[-recommender.maxlen:] for h in recommend_test.some_histories(trained)[:6]]
  histories = recent + [np.zeros(0, np.int32)]
  inputs_BxT = recommender_lib.left_padded(histories, len(histories), recommender.maxlen)
  np.save(tmp_path / 'histories.npy', inputs_BxT)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run([sys.executable, '-c', SERVE, str(exported), 'histories.npy'],
                          cwd=tmp_path, env=env, check=False, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  served = json.loads(result.stdout.splitlines()[-1])

  expected = recommender.recommend([recommender.item_ids[h.astype(int) - 1].tolist()
                                    for h in histories], k=K)
  assert served['batch']['dtypes'] == ['int32', 'float32']
  assert served['batch']['raw'] == expected.items.tolist()
  np.testing.assert_allclose(served['batch']['scores'], expected.scores, rtol=1e-5, atol=1e-6)
  assert served['one']['items'] == served['batch']['items'][:1]
  assert expected.popular.tolist() == [False] * 6 + [True]  # the empty row: popularity
  for row, items in zip(inputs_BxT, served['batch']['items']):
    assert not set(items) & set(row.tolist())


def test_export_replaces_an_export_but_no_other_directory(recommender, trained, exported):
  with pytest.raises(ValueError, match='holds other things than an export'):
    export.write_export(recommender, trained.workdir, k=K)
  assert os.path.isdir(os.path.join(trained.workdir, 'checkpoints'))
  export.write_export(recommender, str(exported), k=K)
  assert sorted(os.listdir(exported)) == sorted(export.FILES)
  assert [p for p in os.listdir(exported.parent) if p.startswith('.tmp')] == []
