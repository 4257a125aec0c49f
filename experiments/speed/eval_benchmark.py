"""Times the successive evaluation on a random SplitDataset with a trivial jitted scorer.

  python -m experiments.speed.eval_benchmark --num_steps=50000 --num_users=20000 --num_items=3000

Reports the time to index the steps, to build every batch on the host alone, and to run
`evaluate` end to end (first call, with compilation, and a second, warm call).
"""

import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from pka_jax.data import sequences
from pka_jax.evaluation import protocol

_NUM_USERS = flags.DEFINE_integer('num_users', 20_000, 'Users.')
_NUM_ITEMS = flags.DEFINE_integer('num_items', 3_000, 'Catalog size.')
_MEAN_LENGTH = flags.DEFINE_integer('mean_length', 50, 'Mean train length (Poisson).')
_NUM_STEPS = flags.DEFINE_integer('num_steps', 50_000, 'Validation interactions.')
_MAXLEN = flags.DEFINE_integer('maxlen', 128, 'T.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 512, 'Evaluation batch size.')
_DIM = flags.DEFINE_integer('dim', 64, 'Embedding width of the scorer.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed.')


def random_dataset(rng: np.random.Generator) -> sequences.SplitDataset:
  num_users, num_items = _NUM_USERS.value, _NUM_ITEMS.value
  lengths = rng.poisson(_MEAN_LENGTH.value, size=num_users)
  train_user = np.repeat(np.arange(num_users), lengths)
  train_item = rng.integers(1, num_items + 1, size=len(train_user), dtype=np.int32)

  def events(n: int) -> sequences.Events:
    return sequences.Events(
        user=rng.integers(0, num_users, size=n, dtype=np.int32),
        item=rng.integers(1, num_items + 1, size=n, dtype=np.int32),
        timestamp=np.arange(n, dtype=np.int64))

  return sequences.SplitDataset(
      train=sequences.SequenceStore.from_sorted(train_user, train_item, num_users),
      valid=events(_NUM_STEPS.value),
      test=events(_NUM_STEPS.value),
      item_ids=np.arange(num_items),
      user_ids=np.arange(num_users),
      info={})


def make_score_fn(rng: np.random.Generator):
  """Scores = embedding of the last input item times the item table."""
  table_VxD = jnp.asarray(rng.normal(size=(_NUM_ITEMS.value + 1, _DIM.value)), jnp.float32)

  @jax.jit
  def score_fn(inputs_BxT: jax.Array) -> jax.Array:
    return table_VxD[inputs_BxT[:, -1]] @ table_VxD.T

  return score_fn


def timed(name: str, fn):
  start = time.perf_counter()
  result = fn()
  logging.info('%-28s %8.2f s', name, time.perf_counter() - start)
  return result


def main(argv):
  del argv
  rng = np.random.default_rng(_SEED.value)
  dataset = random_dataset(rng)
  score_fn = make_score_fn(rng)
  maxlen, batch_size = _MAXLEN.value, _BATCH_SIZE.value
  logging.info('backend %s, %d train interactions', jax.default_backend(),
               len(dataset.train.items))

  steps = timed('successive_steps', lambda: protocol.successive_steps(
      dataset, 'valid', maxlen=maxlen))
  timed('build all batches (host)', lambda: sum(1 for _ in steps.batches(batch_size)))
  for name in ('evaluate (with compile)', 'evaluate (warm)'):
    summary = timed(name, lambda: protocol.evaluate(
        score_fn, dataset, 'valid', maxlen=maxlen, batch_size=batch_size, progress=False))
  logging.info('%s', summary)


if __name__ == '__main__':
  app.run(main)
