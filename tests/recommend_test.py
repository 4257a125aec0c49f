"""Recommendations from a workdir alone: the evaluation's top-k, in raw ids, from any directory.

The tests' one trained workdir (conftest's `trained_test_run`: trained with a relative
data_dir, as the README's commands do, then moved elsewhere) is what every test below reads:
a moved workdir with no dataset beside it.
"""

import collections
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from configs import test as test_config
from pka_jax import data
from pka_jax import jobs
from pka_jax.evaluation import ranking
from pka_jax.serving import files as serving_files
from pka_jax.serving import queries
from pka_jax.serving import recommender as recommender_lib
from pka_jax.model.encoder import create_model
from pka_jax.model.encoder import Encoder
from pka_jax.training import optimizer
from pka_jax.training.loop import Trainer

K = 10


@pytest.fixture(scope='module')
def trained(trained_test_run):
  """The tests' trained workdir (conftest), moved away from where it was trained; the
  dataset stays there."""
  return trained_test_run


@pytest.fixture(scope='module')
def recommender(trained):
  return recommender_lib.Recommender.from_workdir(trained.workdir)


@pytest.fixture(scope='module')
def best_run(trained):
  """The training code's own view of the best checkpoint."""
  run = Trainer.create(trained.config, trained.workdir)
  run.restore_latest()
  run.restore_best()
  yield run
  run.checkpoints.close()


def raw(recommender, dense) -> list:
  return recommender.item_ids[np.asarray(dense, np.int64) - 1].tolist()


def evaluation_top_k(run, histories_dense, k=K):
  """Top-k items and scores by the evaluation code: score_last on the last T items, then
  ranking.top_k_ranks's seen-item masking and top-k."""
  maxlen = run.config.maxlen
  inputs_BxT = np.zeros((len(histories_dense), maxlen), np.int32)
  seen_BxS = np.zeros((len(histories_dense), 64), np.int32)
  for row, history in enumerate(histories_dense):
    recent = history[-maxlen:]
    inputs_BxT[row, maxlen - len(recent):] = recent
    seen_BxS[row, :len(history)] = history
  scores_BxV = run.placement.eval_model.apply({'params': run.state.params}, inputs_BxT,
                                    method=Encoder.score_last)
  items_BxK, _ = ranking.top_k_ranks(scores_BxV, seen_BxS, np.zeros(len(inputs_BxT), np.int32),
                                      top_k=k)
  items_BxK = np.asarray(items_BxK)
  return items_BxK, np.take_along_axis(np.asarray(scores_BxV), items_BxK, axis=1)


def some_histories(trained, count=20):
  """Users' full histories, some longer than maxlen, and some short prefixes."""
  histories = serving_files.full_histories(trained.dataset)
  full = [np.asarray(histories[u]) for u in range(count)]
  assert max(map(len, full)) > trained.config.maxlen
  return full + [h[:3] for h in full[:5]] + [h[:1] for h in full[:2]]


def test_recommendations_are_the_evaluation_codes_top_k(trained, recommender, best_run):
  histories = some_histories(trained)
  expected_items, expected_scores = evaluation_top_k(best_run, histories)
  got = recommender.recommend([raw(recommender, h) for h in histories], k=K)
  assert got.items.shape == (len(histories), K)
  assert got.items.tolist() == [raw(recommender, row) for row in expected_items]
  np.testing.assert_allclose(got.scores, expected_scores, rtol=1e-5, atol=1e-5)
  assert not got.popular.any()


def test_the_best_step_is_the_one_the_run_tested(trained, recommender):
  with open(os.path.join(trained.workdir, 'results.json')) as f:
    assert recommender.step == json.load(f)['best_step']


def test_one_history_alone_or_in_a_batch_gets_the_same_list(trained, recommender):
  histories = [raw(recommender, h) for h in some_histories(trained)[:9]]
  batch = recommender.recommend(histories, k=K)
  for row, history in enumerate(histories):
    alone = recommender.recommend(history, k=K)
    assert alone.items.shape == (K,)
    assert alone.items.tolist() == batch.items[row].tolist()
    np.testing.assert_allclose(alone.scores, batch.scores[row], rtol=1e-5, atol=1e-5)


def test_history_items_never_appear_unless_allowed(trained, recommender):
  num_items = len(recommender.item_ids)
  for history in some_histories(trained)[:5]:
    history = raw(recommender, history)
    everything = recommender.recommend(history, k=num_items - len(set(history)))
    assert not set(everything.items.tolist()) & set(history)
    assert set(everything.items.tolist()) | set(history) == set(recommender.item_ids.tolist())
    scores = np.asarray(everything.scores)
    assert (np.diff(scores) <= 0).all()
  with_seen = recommender.recommend(history, k=num_items, exclude_seen=False)
  assert set(with_seen.items.tolist()) == set(recommender.item_ids.tolist())
  unseen_order = [item for item in with_seen.items.tolist() if item not in history]
  assert unseen_order[:K] == everything.items[:K].tolist()


def test_candidates_restrict_the_full_ranking(trained, recommender):
  history = raw(recommender, some_histories(trained)[0])
  rng = np.random.default_rng(0)
  candidates = rng.choice(recommender.item_ids, 25, replace=False).tolist() + [history[-1]]
  left = len(set(candidates) - set(history))
  restricted = recommender.recommend(history, k=left, candidates=candidates)
  full = recommender.recommend(history, k=len(recommender.item_ids) - len(set(history)))
  assert restricted.items.tolist() == [i for i in full.items.tolist() if i in candidates]
  with pytest.raises(recommender_lib.TooFewItemsError, match=f'only {left} items are left'):
    recommender.recommend(history, k=left + 1, candidates=candidates)


def training_popularity(dataset, k):
  counts = collections.Counter(np.asarray(dataset.train.items).tolist())
  ranked = sorted(counts, key=lambda item: (-counts[item], item))[:k]
  total = sum(counts.values())
  return ranked, [counts[item] / total for item in ranked]


def test_empty_history_gets_the_most_popular_training_items(trained, recommender):
  dense, shares = training_popularity(trained.dataset, K)
  for empty in ([], np.array([], recommender.item_ids.dtype)):
    got = recommender.recommend(empty, k=K)
    assert got.popular
    assert got.items.tolist() == raw(recommender, dense)
    np.testing.assert_allclose(got.scores, shares, rtol=1e-6)


def test_unknown_items_are_skipped_with_one_warning(trained, recommender, caplog):
  history = raw(recommender, some_histories(trained)[1])
  with_unknown = [-5] + history[:4] + [10**9] + history[4:] + [-5]
  with caplog.at_level(logging.WARNING):
    got = recommender.recommend([with_unknown, [10**9, 10**9 + 1]], k=K)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert '-5' in warnings[0] and str(10**9) in warnings[0] and str(10**9 + 1) in warnings[0]
  assert got.items[0].tolist() == recommender.recommend(history, k=K).items.tolist()
  assert got.popular.tolist() == [False, True]
  assert got.items[1].tolist() == recommender.recommend([], k=K).items.tolist()


def test_k_beyond_the_items_left_is_an_error_that_says_so(trained, recommender):
  num_items = len(recommender.item_ids)
  histories = [[], raw(recommender, some_histories(trained)[2])]
  left = num_items - len(set(histories[1]))
  assert len(recommender.recommend(histories[1], k=left).items) == left
  with pytest.raises(recommender_lib.TooFewItemsError,
                     match=f'k={left + 1} but only {left} items are left for history 1') as error:
    recommender.recommend(histories, k=left + 1)
  assert error.value.row == 1


def test_user_history_is_train_then_held_out(trained, recommender):
  dataset = trained.dataset
  test_users, test_items = np.asarray(dataset.test.user), np.asarray(dataset.test.item)
  user = int(test_users[0])
  history = recommender.user_history(recommender.user_ids[user].item())
  train_items = np.asarray(dataset.train[user])
  held_out = (np.count_nonzero(np.asarray(dataset.valid.user) == user)
              + np.count_nonzero(test_users == user))
  assert len(history) == len(train_items) + held_out
  assert history[:len(train_items)] == raw(recommender, train_items)
  assert history[-1] == raw(recommender, test_items[test_users == user][-1:])[0]
  with pytest.raises(KeyError, match='not a user'):
    recommender.user_history(10**9)


def test_parameters_are_the_best_checkpoints(recommender, best_run):
  same = jax.tree.map(np.array_equal, recommender.params, best_run.state.params)
  assert all(jax.tree.leaves(same))


def test_workdirs_without_serving_files_get_them_on_first_use(trained, recommender, tmp_path,
                                                              monkeypatch):
  old = tmp_path / 'old_run'
  shutil.copytree(trained.workdir, old)
  shutil.rmtree(old / serving_files.SERVING_DIR)
  monkeypatch.chdir(trained.train_cwd)  # where the saved relative data_dir points
  history = raw(recommender, some_histories(trained)[3])
  rebuilt = recommender_lib.Recommender.from_workdir(str(old))
  assert (old / serving_files.SERVING_DIR / 'meta.json').exists()
  assert rebuilt.recommend(history).items.tolist() == recommender.recommend(history).items.tolist()
  assert [p.name for p in old.iterdir() if p.name.startswith('.tmp')] == []


def test_synthetic_workdirs_without_serving_files_rebuild_them_anywhere(trained, recommender,
                                                                        tmp_path, monkeypatch):
  old = tmp_path / 'old_run'
  shutil.copytree(trained.workdir, old)
  shutil.rmtree(old / serving_files.SERVING_DIR)
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  rebuilt = recommender_lib.Recommender.from_workdir(str(old))
  assert list(elsewhere.iterdir()) == []  # the data was regenerated in a scratch directory
  user = recommender.user_ids[3].item()
  assert rebuilt.user_history(user) == recommender.user_history(user)


def test_missing_workdir_and_step_are_named(tmp_path, trained):
  with pytest.raises(FileNotFoundError, match='No workdir'):
    recommender_lib.Recommender.from_workdir(str(tmp_path / 'nothing'))
  with pytest.raises(FileNotFoundError, match='No checkpoint of step 12345'):
    recommender_lib.Recommender.from_workdir(trained.workdir, step=12345)


# ---- the command line, in subprocesses run from a directory that is not the training one ----


def run_cli(trained, *args, cwd):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run(
      [sys.executable, '-m', 'pka_jax.recommend', f'--workdir={trained.workdir}', *args],
      cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, *fragments):
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, result.stderr
  assert 'Traceback' not in result.stderr
  for fragment in fragments:
    assert fragment in lines[0]


def test_cli_recommends_for_a_history_from_another_directory(trained, recommender, tmp_path):
  """Issue 7, defect 5: the saved data_dir is relative to where training ran; recommending
  must need the workdir only."""
  history = raw(recommender, some_histories(trained)[4])
  result = run_cli(trained, f'--history={",".join(map(str, history))}', '--k=5', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  rows = [line.split() for line in result.stdout.splitlines()]
  expected = recommender.recommend(history, k=5)
  assert [int(row[1]) for row in rows] == expected.items.tolist()
  np.testing.assert_allclose([float(row[2]) for row in rows], expected.scores, atol=1e-4)
  assert list(tmp_path.iterdir()) == []


def test_cli_scores_a_file_into_json_lines(trained, recommender, tmp_path):
  histories = [raw(recommender, h) for h in some_histories(trained)[:4]]
  user = recommender.user_ids[7].item()
  lines = [','.join(map(str, histories[0])),
           json.dumps({'history': histories[1] + [10**9], 'id': 'b'}),
           json.dumps({'user': user}),
           '',
           ','.join(map(str, histories[2]))]
  (tmp_path / 'in.txt').write_text('\n'.join(lines) + '\n')
  result = run_cli(trained, '--input=in.txt', '--output=out/top.jsonl', f'--k={K}', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stderr.count(str(10**9)) == 1  # one warning names the unknown item
  records = [json.loads(line) for line in (tmp_path / 'out' / 'top.jsonl').read_text().splitlines()]
  expected = recommender.recommend(
      [histories[0], histories[1], recommender.user_history(user), [], histories[2]], k=K)
  assert [r['items'] for r in records] == expected.items.tolist()
  np.testing.assert_allclose([r['scores'] for r in records], expected.scores, rtol=1e-6)
  assert [r['source'] for r in records] == ['model'] * 3 + ['popularity', 'model']
  assert records[1]['id'] == 'b' and records[2]['user'] == user
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['top.jsonl']


def test_cli_mistakes_are_one_line_errors(trained, recommender, tmp_path):
  (tmp_path / 'bad.jsonl').write_text('1,2,3\n{"history": [1, 2], "user": 4}\n')
  assert_one_line_error(run_cli(trained, '--input=bad.jsonl', cwd=tmp_path), 'bad.jsonl:2')
  user = json.dumps(recommender.user_ids[0].item())
  (tmp_path / 'users.jsonl').write_text(f'{{"user": {user}}}\n{{"user": 123456789}}\n')
  assert_one_line_error(run_cli(trained, '--input=users.jsonl', '--output=o.jsonl', cwd=tmp_path),
                        'users.jsonl:2', '123456789')
  assert not (tmp_path / 'o.jsonl').exists()
  all_but_two = recommender.item_ids[2:].tolist()
  (tmp_path / 'long.csv').write_text(f'{all_but_two[0]}\n{",".join(map(str, all_but_two))}\n')
  assert_one_line_error(run_cli(trained, '--input=long.csv', '--k=5', cwd=tmp_path),
                        'long.csv:2', 'k=5')
  assert_one_line_error(run_cli(trained, '--history=a,b', cwd=tmp_path), '--history', "'a'")
  missing = subprocess.run(
      [sys.executable, '-m', 'pka_jax.recommend', '--workdir=nowhere', '--history=1'],
      cwd=tmp_path, check=False, capture_output=True, text=True, timeout=300)
  assert_one_line_error(missing, 'nowhere')


def fake_catalog(ids_dtype):
  """What parsing reads from a Recommender: the raw id types and users' histories."""
  item_ids = np.array(['a', 'b,c', 'd'] if ids_dtype is str else [10, 20, 30])
  return SimpleNamespace(item_ids=item_ids, user_ids=item_ids,
                         user_history=lambda user: [f'history of {user!r}'])


def test_input_lines_parse_as_csv_or_json_in_the_catalogs_id_type():
  ints, strs = fake_catalog(int), fake_catalog(str)
  assert queries.parse_line('10, 30,20', 'f:1', ints) == ([10, 30, 20], {})
  assert queries.parse_line('', 'f:1', ints) == ([], {})
  assert queries.parse_line('a,"b,c"', 'f:1', strs) == (['a', 'b,c'], {})
  assert queries.parse_line('{"history": [10, "20"], "id": 7}', 'f:1', ints) == (
      [10, 20], {'id': 7})
  assert queries.parse_line('{"history": [5]}', 'f:1', strs) == (['5'], {})
  assert queries.parse_line('{"user": "20"}', 'f:1', ints) == (
      ['history of 20'], {'user': '20'})


@pytest.mark.parametrize('line, message', [
    ('10,x', "f:3: 'x' is not an integer id"),
    ('{"history": [10, 2.5]}', 'f:3: field "history": 2.5 is not an integer id'),
    ('{"history": 10}', 'f:3: field "history" must be a list'),
    ('{"history": [], "user": 1}', 'f:3: expected an object with exactly one of'),
    ('{"history": [1,}', 'f:3: not a JSON object'),
    ('{"user": true}', 'f:3: field "user": True is not an integer id'),
])
def test_bad_input_lines_are_named(line, message):
  with pytest.raises(queries.InputError, match=re.escape(message)):
    queries.parse_line(line, 'f:3', fake_catalog(int))


def test_a_table_split_over_devices_recommends_like_one_device(tmp_path):
  # A run with its item table split over 4 devices (mesh_model) is served split over 4 of
  # this host's devices (conftest: 8 CPU devices): the shards' lists merge into one device's.
  config = test_config.get_config()
  config.max_epochs, config.mesh_model = 1, 4
  config.data_dir = str(tmp_path / 'data')
  workdir = str(tmp_path / 'run')
  jobs.train(config, workdir)
  split = recommender_lib.Recommender.from_workdir(workdir)
  whole = recommender_lib.Recommender.from_workdir(workdir, devices=jax.local_devices()[:1])
  assert split.model.mesh.shape == {'data': 1, 'model': 4} and whole.model.mesh is None
  table = split.params['item_emb']['embedding']
  assert table.shape[0] == 64 and table.addressable_shards[0].data.shape[0] == 16
  histories = [[], [3], list(range(1, 30)), [7, 8, 9, 10, 11]]
  raw_histories = [raw(whole, h) for h in histories]
  got = split.recommend(raw_histories, k=K, candidates=whole.item_ids[:40].tolist())
  want = whole.recommend(raw_histories, k=K, candidates=whole.item_ids[:40].tolist())
  np.testing.assert_array_equal(got.items, want.items)
  np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got.popular, want.popular)



def test_visible_alike_padding_keys_score_trimmed_windows_as_full_ones(tmp_path):
  # SASRec with the authors' visible padding keys: every padding key is the same key, so a
  # window cut to the longest history plus one padding column scores as the maxlen window
  # does (encoder.Encoder); an untrained model is enough, its padding weighs on every score.
  config = test_config.get_config('model=sasrec')
  config.mask_padding_keys, config.maxlen = False, 64
  config.data_dir = str(tmp_path / 'data')
  dataset = data.load_dataset(config)
  model = create_model(config, dataset.num_items, deterministic=True)
  params = jax.jit(functools.partial(optimizer.create_train_state, model, config))(
      jax.random.key(3)).params
  recommender = recommender_lib.Recommender(
      config=config, params=params, served=serving_files.ServingData.from_dataset(dataset), step=0)
  widths = []
  top_k = recommender._top_k
  def spied(params, inputs_BxT, *args, **kwargs):
    widths.append(inputs_BxT.shape[1])
    return top_k(params, inputs_BxT, *args, **kwargs)
  recommender._top_k = spied
  score_last = jax.jit(functools.partial(recommender.model.apply, method=Encoder.score_last))
  rng = np.random.default_rng(0)
  # Longest 16, a power of two: without the padding column its window would have none.
  batches = [[16, 5, 1, 9], [3], [40, 2]]
  for lengths in batches:
    histories = [rng.choice(np.arange(1, dataset.num_items + 1), n, replace=False)
                 for n in lengths]
    got = recommender.recommend([raw(recommender, h) for h in histories], k=K)
    inputs_BxT = recommender_lib.left_padded(histories, len(histories), config.maxlen)
    scores_BxV = np.asarray(score_last({'params': params}, inputs_BxT))
    seen = np.zeros((len(histories), dataset.num_items + 1), bool)
    for row, history in enumerate(histories):
      seen[row, history] = True
    scores_BxV = np.where(seen, -np.inf, scores_BxV)[:, 1:]
    want_BxK = np.argsort(-scores_BxV, axis=1, kind='stable')[:, :K] + 1
    assert got.items.tolist() == [raw(recommender, row) for row in want_BxK]
    np.testing.assert_allclose(got.scores, np.take_along_axis(scores_BxV, want_BxK - 1, 1),
                               rtol=1e-5, atol=1e-5)
  assert widths == [32, 8, 64]
