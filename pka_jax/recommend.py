"""Top-k recommendations from the best checkpoint of a run, in the dataset's raw item ids.

  python -m pka_jax.recommend --workdir=runs/synthetic --history=12,7,33 --k=10
  python -m pka_jax.recommend --workdir=runs/synthetic --user=42
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from pka_jax import checkpoint
from pka_jax import train
from pka_jax.data.sequences import SplitDataset


class Recommender:
  """The best parameters of a workdir's run, its config and its dataset's id maps."""

  def __init__(self, workdir: str):
    self.run = train.Run(checkpoint.restore_config(workdir), workdir)
    self.run.restore_latest()
    self.run.restore_best()
    dataset: SplitDataset = self.run.dataset
    self.item_ids = np.asarray(dataset.item_ids)
    self.user_ids = np.asarray(dataset.user_ids)
    self._dense_item = {raw: dense for dense, raw in enumerate(self.item_ids.tolist(), 1)}
    self._dense_user = {raw: dense for dense, raw in enumerate(self.user_ids.tolist())}

  def user_history(self, raw_user) -> list:
    """Every item of a known user (train, then validation, then test), as raw ids."""
    if raw_user not in self._dense_user:
      raise KeyError(f'user {raw_user!r} is not in dataset {self.run.config.dataset!r}')
    user, dataset = self._dense_user[raw_user], self.run.dataset
    parts = [np.asarray(dataset.train[user])]
    parts += [np.asarray(e.item)[np.asarray(e.user) == user] for e in (dataset.valid, dataset.test)]
    return self.item_ids[np.concatenate(parts) - 1].tolist()

  def recommend(self, history: list, k: int = 10) -> list[tuple[object, float]]:
    """The k best unseen items after `history` (raw ids, oldest first), with their scores."""
    unknown = [item for item in history if item not in self._dense_item]
    if unknown:
      raise KeyError(f'items not in the catalog of {self.run.config.dataset!r}: {unknown[:10]}')
    dense = np.array([self._dense_item[item] for item in history], dtype=np.int32)
    maxlen = self.run.config.maxlen
    inputs_1xT = np.zeros((1, maxlen), np.int32)
    recent = dense[-maxlen:]
    inputs_1xT[0, maxlen - len(recent):] = recent
    batch = np.repeat(inputs_1xT, self.run.config.eval_batch_size, axis=0)  # fixed shape
    scores_V = jnp.asarray(self.run._score(self.run.state.params, batch)[0])
    scores_V = scores_V.at[0].set(-jnp.inf).at[dense].set(-jnp.inf)
    top_scores, top_items = jax.lax.top_k(scores_V, k)
    return [(self.item_ids[i - 1].item(), float(s))
            for i, s in zip(np.asarray(top_items), np.asarray(top_scores)) if np.isfinite(s)]


def typed_ids(tokens: list[str], ids: np.ndarray) -> list:
  """Command-line tokens as the dataset's raw id type: ints when its ids are integers."""
  return [int(t) for t in tokens] if np.issubdtype(ids.dtype, np.integer) else list(tokens)


flags.DEFINE_string('workdir', None, 'A training run directory with checkpoints.')
flags.DEFINE_list('history', [], 'Raw item ids, oldest first.')
flags.DEFINE_string('user', None, "A dataset user's raw id: recommend after their history.")
flags.DEFINE_integer('k', 10, 'How many items.')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if bool(FLAGS.history) == bool(FLAGS.user):
    raise app.UsageError('Give exactly one of --history and --user')
  recommender = Recommender(FLAGS.workdir)
  try:
    if FLAGS.user:
      history = recommender.user_history(typed_ids([FLAGS.user], recommender.user_ids)[0])
    else:
      history = typed_ids(FLAGS.history, recommender.item_ids)
    recommendations = recommender.recommend(history, FLAGS.k)
  except KeyError as error:
    raise app.UsageError(str(error.args[0])) from None
  for rank, (item, score) in enumerate(recommendations, 1):
    print(f'{rank:>3}  {item}  {score:.4f}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
