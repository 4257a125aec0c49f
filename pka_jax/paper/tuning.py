"""Hyper-parameter search on Optuna: the paper's protocol on any dataset.

TPE over a config's `search_space` (field names to their choices), every trial a normal run in
`ROOT/trials/NUMBER/` trained by `jobs.train` (as `pka_jax.main` trains), its value the best
validation NDCG@10 under the config's early stopping. The study lives in the root (a journal
file) or in any database Optuna takes (`storage`), so the same command goes on where it
stopped and several processes, on one machine or many, share one study:

* a trial's process holds its lock (`ROOT/locks/NUMBER.lock`) while it runs; a trial left
  RUNNING by a process that died (its lock free, or on another machine its heartbeat older
  than `grace_s`) is resumed from its own checkpoint by the next process that comes, and
  counted once;
* a new trial is asked for under a lock on the root, so the study ends with the trials asked
  for; the sampler of trial n is seeded with (seed, n), so processes draw different points;
* a trial whose parameters a finished trial has already is answered from it, not trained;
* every validation is reported, so a pruner can stop a trial (it keeps its workdir and last
  value); a trial whose loss is not finite, or whose configuration the checks refuse, ends
  as FAIL with its reason, and the search goes on.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import functools
import io
import json
import logging as std_logging
import os
import socket
import time
import warnings
from collections.abc import Iterator
from typing import Any

from absl import logging
import ml_collections
import optuna
from optuna.trial import FrozenTrial, TrialState

from pka_jax import config_check
from pka_jax import files
from pka_jax import jobs
from pka_jax.data.errors import DataError
from pka_jax.paper import grid
from pka_jax.training import faults

STUDY_NAME = 'pka_jax'
PRUNERS = ('none', 'median', 'hyperband')
WARMUP_EPOCHS = 5
OBJECTIVE = 'valid/ndcg@10'
# Faults of one trial's configuration or training: the trial fails, the search goes on.
TRIAL_FAULTS = (config_check.ConfigError, faults.NonFiniteLoss, DataError)


class SearchError(ValueError):
  """The search cannot start: a bad search space, storage or root. The message says why."""


@dataclasses.dataclass(frozen=True)
class Search:
  """A search: the base config (its `search_space` included), where it lives, how long."""

  base: ml_collections.ConfigDict
  root: str
  trials: int
  seed: int = 0
  pruner: str = 'none'
  storage: str | None = None  # a database URL; None: a journal file in the root
  study_name: str = STUDY_NAME
  grace_s: float = 600.0  # another machine's trial without a heartbeat this long is orphaned
  train_devices: int | None = None

  @functools.cached_property
  def space(self) -> dict[str, list]:
    return search_space(self.base)


# ---- the search space ----


def search_space(config: ml_collections.ConfigDict) -> dict[str, list]:
  """`config.search_space` as `{field: choices}`, nested fields dotted; SearchError names a
  field that is not one of the config, or choices that are not a non-empty list of plain
  values, or a choice the config checks refuse on its own (a dropout of 1.5, say)."""
  space = flat_space(config.get('search_space') or {})
  if not space:
    raise SearchError('search_space: empty; give the config fields to search and their '
                      'choices (configs/default.py)')
  fields = set(grid.flatten(_without_space(config)))
  for field, choices in space.items():
    if field not in fields:
      raise SearchError(f'search_space.{field}: not a field of the config')
    if not (isinstance(choices, (list, tuple)) and choices
            and all(isinstance(c, (bool, int, float, str)) for c in choices)):
      raise SearchError(f'search_space.{field}: expected a non-empty list of numbers, strings '
                        f'or booleans, got {choices!r}')
    for choice in choices:  # on its own; choices that clash with others fail their trial
      problems = [p for p in config_check.field_problems(with_params(config, {field: choice}))
                  if p.startswith(field.split('.')[-1] + ':')]
      if problems:
        raise SearchError(f'search_space.{field}: the choice {choice!r} is refused: '
                          + '; '.join(problems))
  return space


def flat_space(space, prefix: str = '') -> dict[str, list]:
  """A `search_space` (nested groups for nested fields) as `{dotted field: choices}`,
  unchecked."""
  flat = {}
  for key, value in (space.items() if hasattr(space, 'items') else ()):
    if hasattr(value, 'items'):
      flat.update(flat_space(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = list(value) if isinstance(value, (list, tuple)) else value
  return flat


def _without_space(config: ml_collections.ConfigDict) -> dict:
  tree = json.loads(config.to_json())
  tree.pop('search_space', None)
  return tree


def with_params(base: ml_collections.ConfigDict, params: dict[str, Any]
                ) -> ml_collections.ConfigDict:
  """A copy of `base` with each (dotted) field of `params` set."""
  config = ml_collections.ConfigDict(base.to_dict())
  for field, value in params.items():
    *groups, name = field.split('.')
    node = config
    for group in groups:
      node = node[group]
    node[name] = value
  return config


# ---- the study ----


def open_study(search: Search) -> optuna.Study:
  """The search's study, created on first use; SearchError for a storage that cannot open."""
  pruner = make_pruner(search)
  os.makedirs(search.root, exist_ok=True)
  try:
    if search.storage is None:
      storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
          os.path.join(search.root, 'study.journal')))
    else:
      storage = optuna.storages.RDBStorage(search.storage)
    return optuna.create_study(storage=storage, study_name=search.study_name,
                               direction='maximize', load_if_exists=True, pruner=pruner)
  except (ImportError, ValueError, OSError, RuntimeError) as error:
    raise SearchError(f'--storage={search.storage}: {str(error).splitlines()[0]}') from None
  except Exception as error:  # pylint: disable=broad-except  # SQLAlchemy's, for one
    raise SearchError(f'--storage={search.storage}: {type(error).__name__}: '
                      f'{str(error).splitlines()[0]}') from None


def make_pruner(search: Search) -> optuna.pruners.BasePruner:
  if search.pruner == 'none':
    return optuna.pruners.NopPruner()
  # Epochs are the steps; the first few are noisy, so neither prunes before WARMUP_EPOCHS.
  warmup = min(WARMUP_EPOCHS, search.base.max_epochs)
  if search.pruner == 'median':
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=warmup)
  if search.pruner == 'hyperband':
    return optuna.pruners.HyperbandPruner(min_resource=warmup,
                                          max_resource=search.base.max_epochs,
                                          reduction_factor=3)
  raise SearchError(f'--pruner={search.pruner}: expected one of {list(PRUNERS)}')


def trial_dir(search: Search, number: int) -> str:
  return os.path.join(search.root, 'trials', str(number))


class FileLock:
  """An exclusive lock on a file (flock), held from `acquire` to `release` by this process;
  the system lets it go when the process ends, however it ends."""

  def __init__(self, path: str):
    self.path, self._handle = path, None

  def acquire(self, blocking: bool = True) -> bool:
    """Whether this process now holds the lock (False: another does, and not `blocking`)."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    handle = open(self.path, 'a')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      handle.close()
      return False
    self._handle = handle
    return True

  def release(self) -> None:
    if self._handle is not None:
      self._handle.close()  # closing the file lets the lock go
      self._handle = None

  def __enter__(self) -> FileLock:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def trial_lock(search: Search, number: int) -> FileLock:
  """Held by the process that runs trial `number`, while it runs."""
  return FileLock(os.path.join(search.root, 'locks', f'{number}.lock'))


# ---- one trial ----


@dataclasses.dataclass
class Outcome:
  """How a trial ended: its state, value, and what was done."""

  state: TrialState
  value: float | None
  note: str = ''


def run_trial(search: Search, study: optuna.Study, trial: optuna.Trial) -> Outcome:
  """Trains (or resumes) `trial` in its directory and tells the study how it ended. The
  caller holds the trial's lock."""
  params = trial.params
  trial.set_user_attr('workdir', trial_dir(search, trial.number))
  heartbeat(trial)
  try:
    config = with_params(search.base, params)
    config_check.check(config)
  except config_check.ConfigError as error:
    return _tell_failed(study, trial, error)

  def on_validation(epoch: int, metrics: dict[str, float]) -> None:
    heartbeat(trial)
    with _quiet_optuna():  # a resumed trial reports its last epoch again: ignored
      trial.report(metrics[OBJECTIVE], epoch)
    if trial.should_prune():
      raise optuna.TrialPruned()

  try:
    results = jobs.train(config, trial_dir(search, trial.number),
                         train_devices=search.train_devices, on_validation=on_validation)
  except optuna.TrialPruned:
    value = _last_reported(study, trial.number)
    study.tell(trial, state=TrialState.PRUNED)
    return Outcome(TrialState.PRUNED, value, 'pruned')
  except TRIAL_FAULTS as error:
    return _tell_failed(study, trial, error)
  value = results['valid']['ndcg@10']
  study.tell(trial, value)
  return Outcome(TrialState.COMPLETE, value)


def heartbeat(trial: optuna.Trial) -> None:
  """Who runs the trial, and that it is alive now."""
  trial.set_user_attr('host', socket.gethostname())
  trial.set_user_attr('pid', os.getpid())
  trial.set_user_attr('heartbeat', time.time())


def _tell_failed(study: optuna.Study, trial: optuna.Trial, error: Exception) -> Outcome:
  reason = str(error).splitlines()[0]
  trial.set_user_attr('fail_reason', reason)
  study.tell(trial, state=TrialState.FAIL)
  return Outcome(TrialState.FAIL, None, reason)


def _last_reported(study: optuna.Study, number: int) -> float | None:
  values = study.get_trials(deepcopy=False)[number].intermediate_values
  return values[max(values)] if values else None


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
  logger = std_logging.getLogger('optuna')
  level = logger.level
  logger.setLevel(std_logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def answer_from_twin(study: optuna.Study, trial: optuna.Trial) -> Outcome | None:
  """Tells `trial` the outcome of a finished trial with its parameters, if there is one: TPE
  draws a point again in a small categorical space, and training it again would give the
  same run."""
  for twin in study.get_trials(deepcopy=False,
                               states=(TrialState.COMPLETE, TrialState.PRUNED)):
    if twin.number != trial.number and twin.params == trial.params:
      trial.set_user_attr('same_as', twin.number)
      if twin.state == TrialState.COMPLETE:
        study.tell(trial, twin.value)
        return Outcome(TrialState.COMPLETE, twin.value, f'as trial {twin.number}')
      for step, value in twin.intermediate_values.items():
        trial.report(value, step)
      study.tell(trial, state=TrialState.PRUNED)
      return Outcome(TrialState.PRUNED, _last_reported(study, trial.number),
                     f'as trial {twin.number}')
  return None


# ---- the search loop ----


def claim_orphan(search: Search, study: optuna.Study
                 ) -> tuple[optuna.Trial, FileLock] | None:
  """A RUNNING trial whose process is gone, and its lock, now held by this process: on this
  machine such a trial's lock is free; on another, its heartbeat is older than `grace_s`."""
  host = socket.gethostname()
  for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    if (frozen.user_attrs.get('host', host) != host
        and time.time() - frozen.user_attrs.get('heartbeat', 0.0) <= search.grace_s):
      continue  # alive on another machine
    lock = trial_lock(search, frozen.number)
    if lock.acquire(blocking=False):
      logging.warning('Resuming trial %d, left running by a process that is gone.',
                      frozen.number)
      trial = optuna.trial.Trial(study, frozen._trial_id)  # pylint: disable=protected-access
      heartbeat(trial)
      return trial, lock
  return None


def take_trial(search: Search, study: optuna.Study
               ) -> tuple[optuna.Trial, FileLock] | None:
  """The trial this process runs next, and its lock, now held: an orphan to resume, else a
  new trial (its parameters drawn); None when the study holds `trials` already. Under the
  root's lock, so processes never ask past the total nor take the same trial."""
  with FileLock(os.path.join(search.root, 'study.lock')):
    orphan = claim_orphan(search, study)
    if orphan is not None:
      return orphan
    number = len(study.get_trials(deepcopy=False))
    if number >= search.trials:
      return None
    # The sampler of trial n is seeded with (seed, n): one process draws as it always does,
    # and processes side by side do not draw the same points.
    study.sampler = optuna.samplers.TPESampler(seed=search.seed * 1_000_003 + number,
                                               constant_liar=True)
    trial = study.ask()
    lock = trial_lock(search, trial.number)
    lock.acquire()
    heartbeat(trial)
    return trial, lock


def run(search: Search, progress: Any = None) -> optuna.Study:
  """Runs the search until the study holds `search.trials` finished trials, resuming orphans
  first. `progress(trial, outcome, study, seconds)` is called after each trial."""
  study = open_study(search)
  while True:
    taken = take_trial(search, study)
    if taken is None:
      if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        break
      time.sleep(2)  # another process's trial: it ends, or it is orphaned and resumed
      continue
    trial, lock = taken
    start = time.perf_counter()
    try:
      # Drawn here, not when asked: a resumed trial keeps its choices and draws any it lacks.
      for field, choices in search.space.items():
        trial.suggest_categorical(field, choices)
      outcome = answer_from_twin(study, trial) or run_trial(search, study, trial)
    finally:
      lock.release()
    write_outputs(search, study)
    if progress is not None:
      progress(trial, outcome, study, time.perf_counter() - start)
  write_outputs(search, study)
  return study


# ---- what a search leaves in its root ----


def rows(search: Search, study: optuna.Study) -> list[dict]:
  """trials.csv: one row a trial. A trial answered from a twin shows the twin's run (its
  workdir and epochs) and no seconds of its own."""
  result = []
  for trial in study.get_trials(deepcopy=False):
    twin = trial.user_attrs.get('same_as', '')
    workdir = trial_dir(search, trial.number if twin == '' else twin)
    records = grid.read_metrics(workdir)
    result.append({
        'number': trial.number, 'state': trial.state.name,
        'value': '' if trial.value is None else trial.value,
        **{field: trial.params.get(field, '') for field in search.space},
        'epochs': len({r['epoch'] for r in records if 'epoch' in r}),
        'seconds': 0.0 if twin != '' else round(grid.wall_seconds(records), 1),
        'same_as': twin, 'fail_reason': trial.user_attrs.get('fail_reason', ''),
        'workdir': workdir})
  return result


def best_trial(study: optuna.Study) -> FrozenTrial | None:
  completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  return max(completed, key=lambda t: (t.value, -t.number)) if completed else None


def write_outputs(search: Search, study: optuna.Study) -> None:
  """trials.csv, best.json, best_config.py, summary.md and the two figures (the figures once
  two trials are complete)."""
  table = rows(search, study)
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=list(table[0]) if table else ['number'])
  writer.writeheader()
  writer.writerows(table)
  files.write_text(os.path.join(search.root, 'trials.csv'), out.getvalue())
  best = best_trial(study)
  if best is not None:
    files.write_json(os.path.join(search.root, 'best.json'),
                     {'number': best.number, 'value': best.value, 'params': best.params})
    files.write_text(os.path.join(search.root, 'best_config.py'),
                     best_config_source(with_params(search.base, best.params), best))
  files.write_text(os.path.join(search.root, 'summary.md'), summary(search, study, table))
  if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2:
    write_figures(search, study)


def best_config_source(config: ml_collections.ConfigDict, best: FrozenTrial) -> str:
  """A config file that `pka_jax.main --config=...` trains as is: the whole config, the
  searched fields the best trial's."""
  return f'''"""The best configuration of a search: trial {best.number}, validation NDCG@10 {best.value:.4f}.

Written by pka_jax.tune. The searched fields are the trial's; every other field is the
searched config's. Train it: python -m pka_jax.main --config=THIS_FILE --workdir=WORKDIR
"""

import json

import ml_collections

CONFIG = json.loads(r\'\'\'{config.to_json(indent=2, sort_keys=True)}\'\'\')


def get_config(arg=None):
  if arg not in (None, 'model=' + CONFIG['model']):
    raise ValueError(f'this config is model={{CONFIG["model"]}}; got the variant {{arg!r}}')
  return ml_collections.ConfigDict(CONFIG)
'''


def summary(search: Search, study: optuna.Study, table: list[dict]) -> str:
  """summary.md: the space, the trials by state, the best, and the ten best trials."""
  states = {}
  for row in table:
    states[row['state']] = states.get(row['state'], 0) + 1
  lines = [f'# Search of `{search.base.dataset}` ({search.base.model})', '',
           f'{len(table)} trials of {search.trials}: '
           + ', '.join(f'{n} {s.lower()}' for s, n in sorted(states.items()))
           + f'; TPE seed {search.seed}, pruner {search.pruner}.', '',
           '| field | choices |', '| --- | --- |']
  lines += [f'| `{f}` | {", ".join(map(str, c))} |' for f, c in search.space.items()]
  best = best_trial(study)
  if best is not None:
    lines += ['', f'Best: trial {best.number}, validation NDCG@10 **{best.value:.4f}** '
              f'(`best_config.py`, `best.json`).']
  ranked = sorted((r for r in table if r['state'] == 'COMPLETE' and r['same_as'] == ''),
                  key=lambda r: -float(r['value']))[:10]
  if ranked:
    fields = list(search.space)
    lines += ['', 'The ten best trials trained (trials answered from a twin left out):', '',
              '| trial | valid NDCG@10 | ' + ' | '.join(fields) + ' | epochs | seconds |',
              '| --- ' * (len(fields) + 4) + '|']
    lines += [f'| {r["number"]} | {float(r["value"]):.4f} | '
              + ' | '.join(str(r[f]) for f in fields) + f' | {r["epochs"]} | {r["seconds"]} |'
              for r in ranked]
  return '\n'.join(lines) + '\n'


def write_figures(search: Search, study: optuna.Study) -> None:
  """The optimisation history and the parameters' importances, as PNG (Optuna's plots)."""
  # Imported here: matplotlib takes half a second, which a search that is stopped or refused
  # before its first trial ends need not pay.
  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt
  from optuna.visualization import matplotlib as plots
  # pylint: enable=g-import-not-at-top
  for name, plot in (('history', plots.plot_optimization_history),
                     ('importances', plots.plot_param_importances)):
    try:
      with _quiet_optuna(), warnings.catch_warnings():
        warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
        ax = plot(study)
    except (ValueError, RuntimeError, ZeroDivisionError) as error:
      logging.info('No %s figure yet: %s', name, error)
      continue
    if name == 'history':
      ax.set_ylabel('validation NDCG@10')
    figure = ax.figure
    try:
      with files.new_file(os.path.join(search.root, f'{name}.png')) as tmp:
        figure.savefig(tmp, format='png', dpi=100, bbox_inches='tight')
    finally:
      plt.close(figure)


def final_seeds(search: Search, study: optuna.Study, seeds: int, command: str) -> str:
  """Trains the best configuration over `seeds` seeds with the grid runner (in ROOT/final);
  the path of its table (mean and 95% interval over seeds)."""
  if best_trial(study) is None:
    raise SearchError('--final_seeds: no completed trial to train again')
  path = os.path.join(search.root, 'best_config.py')
  cell = grid.Cell(path, search.base.model)
  root = os.path.join(search.root, 'final')
  grid.run_grid(grid.specs([cell], range(seeds), root), root, command,
                train_fn=lambda config, workdir: jobs.train(
                    config, workdir, train_devices=search.train_devices))
  return os.path.join(root, 'table.md')
