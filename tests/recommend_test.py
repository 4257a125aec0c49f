"""Recommendations from a checkpoint, in raw ids, never repeating the history."""

import os

import numpy as np
import pytest

from configs import test as test_config
from pka_jax import recommend
from pka_jax import train


@pytest.fixture(scope='module')
def recommender(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  config = test_config.get_config()
  config.data_dir = os.path.join(workdir, 'data')
  config.max_epochs = 2
  train.train_and_evaluate(config, workdir)
  return recommend.Recommender(workdir)


def test_recommends_k_unseen_catalog_items_best_first(recommender):
  history = recommender.item_ids[[3, 1, 4, 1, 5]].tolist()
  recommendations = recommender.recommend(history, k=10)
  items = [item for item, _ in recommendations]
  scores = [score for _, score in recommendations]
  assert len(items) == 10 and len(set(items)) == 10
  assert not set(items) & set(history)
  assert set(items) <= set(recommender.item_ids.tolist())
  assert scores == sorted(scores, reverse=True)


def test_scores_are_the_models_scores_after_the_history(recommender):
  history = recommender.item_ids[[7, 2, 9]].tolist()
  best_item, best_score = recommender.recommend(history, k=1)[0]
  run = recommender.run
  inputs = np.zeros((run.config.eval_batch_size, run.config.maxlen), np.int32)
  inputs[:, -3:] = [8, 3, 10]  # dense ids are raw positions + 1
  scores = np.array(run._score(run.state.params, inputs)[0])
  scores[[0, 8, 3, 10]] = -np.inf
  assert recommender.item_ids[scores.argmax() - 1] == best_item
  assert scores.max() == pytest.approx(best_score, rel=1e-5)


def test_user_history_is_train_then_held_out(recommender):
  dataset = recommender.run.dataset
  test_users, test_items = np.asarray(dataset.test.user), np.asarray(dataset.test.item)
  user = int(test_users[0])
  history = recommender.user_history(recommender.user_ids[user].item())
  train_items = np.asarray(dataset.train[user])
  held_out = (np.count_nonzero(np.asarray(dataset.valid.user) == user)
              + np.count_nonzero(test_users == user))
  assert len(history) == len(train_items) + held_out
  assert history[:len(train_items)] == recommender.item_ids[train_items - 1].tolist()
  assert history[-1] == recommender.item_ids[test_items[test_users == user][-1] - 1]


def test_unknown_items_and_users_are_named(recommender):
  with pytest.raises(KeyError, match='not in the catalog'):
    recommender.recommend([10**9])
  with pytest.raises(KeyError, match='not in dataset'):
    recommender.user_history(10**9)


def test_typed_ids_follow_the_dataset():
  assert recommend.typed_ids(['3', '5'], np.array([1, 2])) == [3, 5]
  assert recommend.typed_ids(['a'], np.array(['a', 'b'])) == ['a']
