"""Command line: hyper-parameter search of a config's `search_space` (pka_jax/paper/tuning.py).

  python -m pka_jax.tune --config=configs/beauty.py:model=pka --trials=60 --root=runs/tune/beauty
  # Rerun to go on; a larger --trials extends the search. Processes with the same command
  # share the study; on several machines, one database they all reach:
  python -m pka_jax.tune ... --storage=postgresql://user@host/db
  # The paper's protocol end to end: the best configuration over seeds afterwards.
  python -m pka_jax.tune ... --final_seeds=3

The root keeps the study (study.journal), each trial's run (trials/NUMBER/), trials.csv,
best.json, best_config.py (train it with pka_jax.main), summary.md and two figures.
"""

import dataclasses
import shlex
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

# JAX, optuna and the rest load in main(), once the flags are parsed (as in pka_jax.main): a
# mistake in them is reported at once instead of after two seconds of imports.
from pka_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Configuration file, its search_space included.',
                                lock_config=True)
flags.DEFINE_string('root', None, 'Directory of the search: its study, trials and results.')
flags.DEFINE_integer('trials', None, 'Trials the study ends with, counting those it holds.',
                     lower_bound=1)
flags.DEFINE_integer('seed', 0, "The TPE sampler's seed.", lower_bound=0)
flags.DEFINE_string('pruner', 'none', "Stop trials early by Optuna's pruner: none (the "
                    "authors' protocol), median or hyperband.")
flags.DEFINE_string('storage', None, 'A database URL Optuna takes (postgresql://, mysql://, '
                    'sqlite:///) for a study shared by machines; default: a journal file in '
                    'the root, shared by the processes of one machine.')
flags.DEFINE_string('study_name', None, 'The study in the storage (default: pka_jax).')
flags.DEFINE_integer('final_seeds', 0, 'After the search, train the best configuration with '
                     'this many seeds (ROOT/final, a table with intervals).', lower_bound=0)
flags.DEFINE_integer('cpu_devices', None, 'As pka_jax.main.', lower_bound=0)
flags.mark_flags_as_required(['config', 'root', 'trials'])


def progress_bar(trials: int, best_trial):
  """One line per finished trial (`best_trial(study)` the best so far) and a bar over the
  study's `trials`."""
  import tqdm  # pylint: disable=g-import-not-at-top  # loaded with the rest, after the flags

  bar = tqdm.tqdm(total=trials, desc='trials', unit='trial', leave=False)

  def report(trial, outcome, study, seconds):
    best = best_trial(study)
    value = '-' if outcome.value is None else f'{outcome.value:.4f}'
    best_text = '-' if best is None else f'{best.value:.4f} (trial {best.number})'
    note = f', {outcome.note}' if outcome.note else ''
    tqdm.tqdm.write(f'trial {trial.number}: {outcome.state.name.lower()} {value}{note}; best '
                    f'{best_text}; {seconds:.0f} s')
    bar.n = len([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()])
    bar.refresh()

  return bar, report


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}')
  with cli.importing():
    # pylint: disable=g-import-not-at-top
    import optuna
    from pka_jax import config_check
    from pka_jax import data
    from pka_jax import sharding
    from pka_jax.data.errors import DataError
    from pka_jax.paper import tuning
    from pka_jax.training import checkpoint
    # pylint: enable=g-import-not-at-top
  # Failures a user can act on: one line on stderr and a non-zero exit.
  user_errors = (tuning.SearchError, config_check.ConfigError, DataError)
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # one line per trial; warnings still show
  checkpoint.quiet_orbax_logging(tracebacks=FLAGS.verbosity >= 1)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  base = FLAGS.config
  search = tuning.Search(base=base, root=FLAGS.root, trials=FLAGS.trials, seed=FLAGS.seed,
                         pruner=FLAGS.pruner, storage=FLAGS.storage,
                         study_name=FLAGS.study_name or tuning.STUDY_NAME)
  with cli.reported_failures(user_errors):
    # The CPU is split before anything asks the backend (the checks below do): for every
    # batch size the search may try.
    choices = [tuning.with_params(base, {field: choice})
               for field, field_choices in tuning.flat_space(base.search_space).items()
               for choice in field_choices if field in ('batch_size', 'eval_batch_size')]
    cpu_devices = cli.split_cpu(FLAGS.cpu_devices, [base, *choices])
    logging.info("Searching %s", search.space)  # a bad space is refused before any work
    config_check.check(base)
    search = dataclasses.replace(search,
                                 train_devices=sharding.devices_to_train(cpu_devices))
    tuning.open_study(search)  # a bad storage too
    data.load_dataset_once(base)  # prepared once for every trial
    bar, report = progress_bar(search.trials, tuning.best_trial)
    try:
      study = tuning.run(search, report)
    finally:
      bar.close()
    best = tuning.best_trial(study)
    print(f'best: trial {best.number}, validation NDCG@10 {best.value:.4f}, '
          f'{best.params}' if best else 'no trial completed')
    print(f'{FLAGS.root}: trials.csv, best.json, best_config.py, summary.md')
    if FLAGS.final_seeds:
      command = ' '.join(['python -m pka_jax.tune', *map(shlex.quote, sys.argv[1:])])
      table = tuning.final_seeds(search, study, FLAGS.final_seeds, command)
      with open(table) as f:
        print(f.read())


if __name__ == '__main__':
  cli.run(main)
