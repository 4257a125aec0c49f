"""Hyper-parameter search on configs/test.py's four-point space: trials as normal runs, a study
that resumes and extends, trials answered from their twins, pruning, faults, what the root
keeps, several processes, and a kill in the middle of a trial."""

import csv
import json
import os
import re
import signal
import subprocess
import sys

import ml_collections
import optuna
from optuna.trial import TrialState
import pytest

from configs import test as test_config
from pka_jax import config_files
from pka_jax.paper import tuning
from pka_jax.training import faults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base(tmp_path, **overrides) -> ml_collections.ConfigDict:
  config = test_config.get_config()
  config.data_dir = str(tmp_path / 'data')
  config.update(overrides)
  return config


def read_csv(root) -> list[dict]:
  with open(os.path.join(root, 'trials.csv')) as f:
    return list(csv.DictReader(f))


def load(search: tuning.Search) -> optuna.Study:
  return tuning.open_study(search)


def epochs_recorded(workdir) -> list[int]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['epoch'] for r in map(json.loads, f) if 'valid/ndcg@10' in r]


def test_a_search_ends_with_its_trials_and_extends_to_more(tmp_path):
  search = tuning.Search(base=base(tmp_path), root=str(tmp_path / 'tune'), trials=6)
  study = tuning.run(search)
  rows = read_csv(search.root)
  assert [int(r['number']) for r in rows] == list(range(6))
  assert {r['state'] for r in rows} <= {'COMPLETE', 'PRUNED'}
  assert not study.get_trials(states=(TrialState.RUNNING,))
  # The best is the largest value, and the validation NDCG@10 of its run's results.
  best = json.loads((tmp_path / 'tune' / 'best.json').read_text())
  values = [float(r['value']) for r in rows if r['state'] == 'COMPLETE']
  assert best['value'] == max(values)
  with open(os.path.join(rows[best['number']]['workdir'], 'results.json')) as f:
    assert json.load(f)['valid']['ndcg@10'] == best['value']
  assert set(best['params']) == {'learning_rate', 'dropout'}
  # Six trials of four points: a twin of a finished trial is answered from it, not trained.
  trained = [r for r in rows if r['same_as'] == '']
  assert len({(r['learning_rate'], r['dropout']) for r in trained}) == len(trained)
  for row in rows:
    if row['same_as'] != '':
      twin = rows[int(row['same_as'])]
      assert (row['value'], row['learning_rate'], row['dropout']) == (
          twin['value'], twin['learning_rate'], twin['dropout'])
      assert float(row['seconds']) == 0.0
      assert not os.path.exists(tmp_path / 'tune' / 'trials' / row['number'])
  # Each trained trial is a normal run of its parameters, early stopping and all.
  for row in trained:
    saved = json.loads(open(os.path.join(row['workdir'], 'results.json')).read())
    assert saved['epochs'] == epochs_recorded(row['workdir'])[-1] == int(row['epochs'])
  for name in ('history.png', 'importances.png', 'summary.md', 'best_config.py'):
    assert os.path.getsize(tmp_path / 'tune' / name) > 100, name
  # The same search asked for 8: exactly two trials more, the first six rows unchanged.
  tuning.run(tuning.Search(base=base(tmp_path), root=search.root, trials=8))
  extended = read_csv(search.root)
  assert len(extended) == 8 and extended[:6] == rows


def test_the_best_config_file_trains_as_a_config(tmp_path):
  search = tuning.Search(base=base(tmp_path, max_epochs=1), root=str(tmp_path / 'tune'),
                         trials=2)
  tuning.run(search)
  best = json.loads((tmp_path / 'tune' / 'best.json').read_text())
  path = str(tmp_path / 'tune' / 'best_config.py')
  config = config_files.load_file(path)
  assert {k: config[k] for k in best['params']} == best['params']
  assert config.model == 'pka' and config.max_epochs == 1
  # On the eight CPU devices the trial trained on (conftest): the same run, exactly.
  eight_devices = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=8"
  result = subprocess.run(
      [sys.executable, '-m', 'pka_jax.main', f'--config={path}', f'--workdir={tmp_path}/w'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'XLA_FLAGS': eight_devices})
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'w' / 'results.json') as f:  # the best trial's run, again
    assert json.load(f)['valid']['ndcg@10'] == best['value']


def test_a_database_storage_holds_the_study(tmp_path):
  # Any URL Optuna's RDBStorage takes (PostgreSQL for many machines); SQLite here.
  url = f'sqlite:///{tmp_path}/study.db'
  search = tuning.Search(base=base(tmp_path, max_epochs=1), root=str(tmp_path / 'tune'),
                         trials=2, storage=url)
  tuning.run(search)
  study = optuna.load_study(study_name=tuning.STUDY_NAME, storage=url)
  assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
  assert not os.path.exists(tmp_path / 'tune' / 'study.journal')


class PruneAfterFirstEpoch(optuna.pruners.BasePruner):

  def prune(self, study, trial) -> bool:
    return len(trial.intermediate_values) >= 1


def test_a_pruned_trial_keeps_its_workdir_and_last_value(tmp_path, monkeypatch):
  monkeypatch.setattr(tuning, 'make_pruner', lambda search: PruneAfterFirstEpoch())
  search = tuning.Search(base=base(tmp_path), root=str(tmp_path / 'tune'), trials=1)
  tuning.run(search)
  row, = read_csv(search.root)
  assert row['state'] == 'PRUNED' and int(row['epochs']) == 1
  with open(os.path.join(row['workdir'], 'metrics.jsonl')) as f:
    first = next(r for r in map(json.loads, f) if 'valid/ndcg@10' in r)
  assert float(row['value']) == first['valid/ndcg@10']
  assert os.listdir(os.path.join(row['workdir'], 'checkpoints'))
  assert not os.path.exists(os.path.join(row['workdir'], 'results.json'))


@pytest.mark.parametrize('name, kind', [('median', optuna.pruners.MedianPruner),
                                        ('hyperband', optuna.pruners.HyperbandPruner),
                                        ('none', optuna.pruners.NopPruner)])
def test_pruners_by_name(tmp_path, name, kind):
  search = tuning.Search(base=base(tmp_path), root=str(tmp_path), trials=1, pruner=name)
  assert isinstance(tuning.make_pruner(search), kind)


def test_an_unknown_pruner_is_refused_by_its_name_before_the_study_opens(tmp_path):
  search = tuning.Search(base=base(tmp_path), root=str(tmp_path / 'tune'), trials=1,
                         pruner='bogus')
  with pytest.raises(tuning.SearchError) as error:
    tuning.open_study(search)
  assert str(error.value) == "--pruner=bogus: expected one of ['none', 'median', 'hyperband']"
  assert not os.path.exists(tmp_path / 'tune')


def test_a_trial_that_fails_is_recorded_and_the_search_goes_on(tmp_path):
  # A learning rate of 1e30 makes the loss non-finite; three heads do not divide 16 units.
  config = base(tmp_path, max_epochs=1)
  config.search_space = ml_collections.ConfigDict(
      {'learning_rate': [1e30, 1e-2], 'num_heads': [2, 3]})
  search = tuning.Search(base=config, root=str(tmp_path / 'tune'), trials=8)
  tuning.run(search)
  rows = read_csv(search.root)
  assert len(rows) == 8
  reasons = {r['fail_reason'] for r in rows if r['state'] == 'FAIL'}
  assert any('non-finite loss' in reason for reason in reasons)
  assert any('num_heads: expected a divisor of hidden_units 16, got 3' in reason
             for reason in reasons)
  assert any(r['state'] == 'COMPLETE' for r in rows)
  for row in rows:
    if row['state'] == 'COMPLETE':
      assert (row['learning_rate'], row['num_heads']) == ('0.01', '2')


@pytest.mark.parametrize('space, message', [
    ({'learning_rte': [1e-3]}, "search_space.learning_rte: not a field of the config"),
    ({'dropout': [1.5]}, 'search_space.dropout: the choice 1.5 is refused: dropout: expected'),
    ({'dropout': []}, 'search_space.dropout: expected a non-empty list'),
    ({}, 'search_space: empty')])
def test_a_bad_search_space_is_refused_before_any_work(tmp_path, space, message):
  config = base(tmp_path)
  config.search_space = ml_collections.ConfigDict(space)
  with pytest.raises(tuning.SearchError, match=message.replace('.', r'\.')):
    tuning.search_space(config)
  assert not os.path.exists(tmp_path / 'data')


def test_nested_fields_are_searched_by_their_dotted_names(tmp_path):
  config = base(tmp_path)
  config.search_space = ml_collections.ConfigDict({'synthetic': {'noise': [0.1, 0.2]}})
  assert tuning.search_space(config) == {'synthetic.noise': [0.1, 0.2]}
  assert tuning.with_params(config, {'synthetic.noise': 0.2}).synthetic.noise == 0.2
  assert config.synthetic.noise == test_config.get_config().synthetic.noise  # a copy


def test_final_seeds_train_the_best_configuration_over_seeds(tmp_path):
  search = tuning.Search(base=base(tmp_path, max_epochs=1), root=str(tmp_path / 'tune'),
                         trials=1)
  study = tuning.run(search)
  table = tuning.final_seeds(search, study, 2, 'the command')
  text = open(table).read()
  assert 'the command' in text and '±' in text
  with open(tmp_path / 'tune' / 'final' / 'runs.csv') as f:
    runs = list(csv.DictReader(f))
  assert [int(r['seed']) for r in runs] == [0, 1]
  trial_0 = json.loads(open(tmp_path / 'tune' / 'trials' / '0' / 'results.json').read())
  # Seed 0 is the best trial's own run, trained again: the same validation.
  assert float(runs[0]['valid/ndcg@10']) == trial_0['valid']['ndcg@10']


# ---- the command line: one line for a bad command, processes sharing a study, a kill ----


def tune(tmp_path, *flags, env=None):
  return [sys.executable, '-m', 'pka_jax.tune', '--config=configs/test.py',
          f'--config.data_dir={tmp_path}/data', f'--root={tmp_path}/tune', *flags]


def run_tune(tmp_path, *flags, env=None):
  return subprocess.run(tune(tmp_path, *flags), cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.parametrize('flags, message', [
    (['--trials=2', '--storage=nosuchdb://host/db'], 'error: --storage=nosuchdb://host/db: '),
    (['--trials=0'], 'error: flag --trials=0: '),
])
def test_a_bad_command_is_one_line(tmp_path, flags, message):
  result = run_tune(tmp_path, *flags)
  assert result.returncode == 1, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-3000:]


def test_preempted_then_killed_in_a_trial_the_rerun_resumes_it_from_its_checkpoint(tmp_path):
  # Trial 0 runs 3 epochs of 6 steps, saved at each epoch's end and every 4 steps.
  flags = ['--trials=2', '--config.checkpoint_every_steps=4', '--verbosity=0']
  search = tuning.Search(base=base(tmp_path), root=str(tmp_path / 'tune'), trials=2)
  # SIGTERM in its 10th step: step 10 is saved and the search exits for a restart.
  preempted = run_tune(tmp_path, *flags, env={faults._TERM_AT: 'step:10'})  # pylint: disable=protected-access
  assert preempted.returncode == faults.PREEMPTED_EXIT_STATUS, preempted.stderr[-3000:]
  assert 'preempted: saved step 10 in ' in preempted.stderr
  assert [t.state for t in load(search).trials] == [TrialState.RUNNING]
  # Rerun, it resumes the trial at step 10; SIGKILL in its 4th step (step 14, after the
  # save of step 12 was asked for; that save may be unfinished).
  killed = run_tune(tmp_path, *flags, env={faults._DIE_AT: 'step:4'})  # pylint: disable=protected-access
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert 'Resuming trial 0' in killed.stderr and 'Resumed from step 10 ' in killed.stderr
  assert [t.state for t in load(search).trials] == [TrialState.RUNNING]
  resumed = run_tune(tmp_path, *flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resuming trial 0' in resumed.stderr
  # From the latest complete checkpoint: step 12 if its save had finished, else one before.
  assert re.search(r'Resumed from step (6|10|12) ', resumed.stderr), resumed.stderr[-3000:]
  study = load(search)
  assert len(study.trials) == 2
  assert not study.get_trials(states=(TrialState.RUNNING,))
  epochs = epochs_recorded(tmp_path / 'tune' / 'trials' / '0')
  assert epochs == [1, 2, 3]  # each epoch recorded once, none trained from scratch again


def test_two_processes_share_one_study_and_train_no_trial_twice(tmp_path):
  processes = [subprocess.Popen(tune(tmp_path, '--trials=4', '--config.max_epochs=1',
                                     '--verbosity=0'), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  search = tuning.Search(base=base(tmp_path), root=str(tmp_path / 'tune'), trials=4)
  study = load(search)
  assert len(study.trials) == 4
  assert all(t.state.is_finished() for t in study.trials)
  # A trial was run by one process: its lines come from one of them, and a trained trial's
  # metrics record each epoch once.
  lines = [line for _, stderr in outputs for line in stderr.splitlines()]
  for trial in study.trials:
    done = [p for p, (stdout, _) in enumerate(outputs)
            if f'trial {trial.number}: ' in stdout]
    assert len(done) == 1, (trial.number, outputs)
    if 'same_as' not in trial.user_attrs:
      epochs = epochs_recorded(tmp_path / 'tune' / 'trials' / str(trial.number))
      assert epochs == sorted(set(epochs))
  assert not any('Resuming trial' in line for line in lines)
