"""Command line: top-k recommendations from a workdir alone (pka_jax/serving/).

  python -m pka_jax.recommend --workdir=runs/synthetic --history=12,7,33 --k=10
  python -m pka_jax.recommend --workdir=runs/synthetic --user=42
  python -m pka_jax.recommend --workdir=runs/synthetic --input=histories.csv --output=top10.jsonl

A workdir is self-contained once `WORKDIR/serving/` exists (written at the end of training, or
on first use from the run's dataset); the parameters come from the checkpoint alone, so a
moved or copied workdir keeps working from any directory. In Python:
`from pka_jax.serving import Recommender`.
"""

from __future__ import annotations

from collections.abc import Iterator

from absl import flags
from absl import logging

from pka_jax import cli
from pka_jax.data.errors import DataError
from pka_jax.serving import queries
from pka_jax.serving import recommender as recommender_lib
# The Python API's earlier home: `from pka_jax.recommend import Recommender` still works.
from pka_jax.serving.recommender import Recommender

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined on demand, so that importing
  `Recommender` from here defines none)."""
  flags.DEFINE_string('workdir', None, 'A training run directory (its checkpoints/ and serving/).')
  flags.DEFINE_list('history', None, 'Raw item ids, oldest first (may be empty: --history=).')
  flags.DEFINE_string('user', None, "A dataset user's raw id: recommend after their history.")
  flags.DEFINE_string('input', None, 'A file of histories: CSV (one history of raw item ids a '
                      'line) or JSON lines ({"history": [...]} or {"user": ...}, optional "id").')
  flags.DEFINE_string('output', None, 'Write JSON lines here (written whole or not at all); '
                      'default: a table (--history, --user) or JSON lines (--input) on stdout.')
  flags.DEFINE_integer('k', 10, 'How many items.', lower_bound=1)
  flags.DEFINE_string('step', 'best', "Checkpoint: 'best', 'latest' or a step number.")
  flags.DEFINE_bool('exclude_seen', True, "Never recommend an item of the history itself.")
  flags.DEFINE_list('candidates', None, 'Recommend only among these raw item ids.')
  flags.DEFINE_string('data_dir', None, 'Only for workdirs trained before serving files existed: '
                      "where the run's dataset is (default: the saved config's data_dir).")


def _records(recommender: Recommender) -> Iterator[dict]:
  allowed_V = None
  if FLAGS.candidates is not None:
    candidates = [queries.typed_id(t, recommender.item_ids, '--candidates')
                  for t in FLAGS.candidates]
    allowed_V, missing = recommender.candidate_mask(candidates)
    recommender_lib.warn_unknown(missing, 'candidate')
  if FLAGS.input:
    yield from queries.recommend_file(recommender, FLAGS.input, FLAGS.k,
                                      exclude_seen=FLAGS.exclude_seen, allowed_V=allowed_V)
    return
  if FLAGS.user is not None:
    try:
      user = queries.typed_id(FLAGS.user, recommender.user_ids, '--user')
      history = recommender.user_history(user)
    except KeyError as error:
      raise queries.InputError(f'--user: {error.args[0]}') from None
  else:
    history = [queries.typed_id(t, recommender.item_ids, '--history') for t in FLAGS.history]
  dense, missing = recommender.dense_items(history)
  recommender_lib.warn_unknown(missing, 'history')
  try:
    top = recommender.recommend_dense([dense], FLAGS.k, exclude_seen=FLAGS.exclude_seen,
                                      allowed_V=allowed_V)
  except recommender_lib.TooFewItemsError as error:
    raise queries.InputError(f'--k: {error}') from None
  yield queries.record(top.items[0], top.scores[0], top.popular[0], {})


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}')
  given = [name for name in ('history', 'user', 'input') if FLAGS[name].value is not None]
  if len(given) != 1:
    cli.fail('give exactly one of --history, --user and --input')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # stdout is the product; warnings still show
  try:
    recommender = Recommender.from_workdir(FLAGS.workdir, FLAGS.step, data_dir=FLAGS.data_dir)
    records = _records(recommender)
    if FLAGS.input or FLAGS.output:
      queries.write_json_lines(records, FLAGS.output)
    else:
      record = next(records)
      for rank, (item, score) in enumerate(zip(record['items'], record['scores']), 1):
        print(f'{rank:>3}  {item}  {score:.4f}')
  except (queries.InputError, DataError, FileNotFoundError) as error:
    cli.fail(str(error))


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['workdir'])
  cli.run(main)
