"""The grid runner: layout of runs, resuming, read-back, and the table over seeds."""

import csv
import io
import json
import os

import jax
import numpy as np
import pytest

from pka_jax import config_files
from pka_jax import jobs
from pka_jax.paper import grid
from pka_jax.training import checkpoint
from pka_jax.training.loop import Trainer

TEST_CONFIG = 'configs/test.py'


def test_runs_live_in_dataset_model_layout_seed_directories():
  cells = grid.cells([TEST_CONFIG], ['pka', 'nope'], ['toeplitz_full', 'k_only'])
  # toeplitz_full is the test config's own PKA layout: the pka cell, run once.
  assert [c.name for c in cells] == ['pka', 'nope', 'pka-k_only']
  spec = grid.Spec(cells[2], 1, 'runs/g', (('max_epochs', '1'),))
  assert spec.workdir == os.path.join('runs/g', 'test', 'pka-k_only', 'seed1')
  assert spec.command() == ('python -m pka_jax.main --config=configs/test.py:model=pka,'
                            'kernel=k_only --config.max_epochs=1 --config.seed=1 '
                            '--workdir=runs/g/test/pka-k_only/seed1')
  config = spec.config()
  assert (config.seed, config.max_epochs, config.kernel_v_side) == (1, 1, 'none')
  # Seeds never change the data: the generator's seed stays the config's.
  assert config.synthetic.seed == config_files.load_file(TEST_CONFIG).synthetic.seed


def test_interval_is_the_student_t_interval_of_the_mean():
  # s = 0.02, t(0.975, df=2) = 4.302653: half-width 4.302653 * 0.02 / sqrt(3) = 0.049683.
  mean, half = grid.interval([0.40, 0.42, 0.44])
  assert mean == pytest.approx(0.42)
  assert half == pytest.approx(0.049683, abs=1e-6)
  assert np.isnan(grid.interval([0.5])[1])


def _rows(test_values: dict[str, list[float]]) -> list[dict]:
  rows = []
  for cell, values in test_values.items():
    for seed, value in enumerate(values):
      row = {'dataset': 'test', 'cell': cell, 'model': cell, 'layout': '', 'seed': seed,
             'epochs': 3, 'best_step': 10, 'wall_s': 60.0}
      # NDCG as given, HR twice it, MRR half of it; COV highest for NoPE.
      for metric, scale in (('ndcg@10', 1.0), ('hr@10', 2.0), ('mrr@10', 0.5)):
        row[f'test/{metric}'] = scale * value
      row['test/cov@10'] = 0.9 if cell == 'nope' else 0.5
      rows.append(row)
  return rows


def test_table_on_hand_made_results():
  values = {'pka': [0.50, 0.52, 0.54], 'sasrec': [0.40, 0.40, 0.40], 'nope': [0.20, 0.21, 0.22]}
  specs = grid.specs(grid.cells([TEST_CONFIG], list(values)), range(3), 'runs/hand')
  table = grid.table_markdown(_rows(values), specs, 'python experiments/reproduce.py …')
  lines = {line.split(' | ')[0].strip('| '): line for line in table.splitlines()
           if line.startswith('| ')}
  # PKA: mean 0.52, half-width 4.302653 * 0.02 / sqrt(3) = 0.0497; best NDCG, HR and MRR.
  assert '**0.5200 ± 0.0497**' in lines['PKA']  # NDCG
  assert '**1.0400 ± 0.0994**' in lines['PKA']  # HR, twice the values
  assert '**0.2600 ± 0.0248**' in lines['PKA']  # MRR, half
  assert '| 0.5000 ± 0.0000 |' in lines['PKA']  # COV: not the best
  assert '**0.9000 ± 0.0000**' in lines['NoPE']  # best COV
  assert '0.4000 ± 0.0000' in lines['SASRec'] and '**' not in lines['SASRec']
  # Relative change against the best baseline of each column: 0.52 / 0.40 - 1 = +30%;
  # COV 0.5 / 0.9 - 1 = -44.4% against NoPE.
  change = lines['PKA vs best baseline']
  assert '+30.0% vs SASRec' in change and '-44.4% vs NoPE' in change
  # Every cell's exact command, with K for the seed.
  assert ('`python -m pka_jax.main --config=configs/test.py:model=sasrec --config.seed=K '
          '--workdir=runs/hand/test/sasrec/seedK`, K in [0, 1, 2]') in table


@pytest.fixture
def interrupt_after_first_epoch(monkeypatch):
  """Stops the first run of the grid after its first epoch, as a killed process would."""
  original = Trainer.run_epoch

  def run_epoch(self, writer):
    if self.progress.epoch == 1:
      raise KeyboardInterrupt
    return original(self, writer)

  monkeypatch.setattr(Trainer, 'run_epoch', run_epoch)
  return monkeypatch


def _latest_params(workdir: str) -> list:
  """The latest checkpoint's parameters, leaf by leaf, restored as a run would."""
  run = Trainer.create(checkpoint.restore_config(workdir), workdir)
  assert run.restore_latest()
  params = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, run.state.params))[0]
  run.checkpoints.close()
  return params


def _validated_epochs(workdir: str) -> list[int]:
  return [r['epoch'] for r in grid.read_metrics(workdir) if 'valid/ndcg@10' in r]


def test_runner_resumes_interrupted_runs_and_reads_back_finished_ones(
    tmp_path, interrupt_after_first_epoch):
  root = str(tmp_path / 'grid')
  specs = grid.specs(grid.cells([TEST_CONFIG], ['pka']), range(2), root,
                     [('max_epochs', '2'), ('patience', '5')])
  with pytest.raises(KeyboardInterrupt):
    grid.run_grid(specs, root, 'reproduce')
  first = specs[0].workdir
  assert _validated_epochs(first) == [1]
  assert not os.path.exists(os.path.join(first, 'results.json'))
  interrupt_after_first_epoch.undo()

  trained, restored = [], []
  restore_latest = Trainer.restore_latest

  def restore_and_record(self):
    found = restore_latest(self)
    restored.append((self.workdir, self.progress.epoch))
    return found

  interrupt_after_first_epoch.setattr(Trainer, 'restore_latest', restore_and_record)

  def train_and_record(config, workdir):
    trained.append(workdir)
    return jobs.train(config, workdir)

  rows = grid.run_grid(specs, root, 'reproduce', train_and_record)
  interrupt_after_first_epoch.undo()
  assert trained == [first, specs[1].workdir]
  # Went on from its checkpoint of epoch 1, not from scratch, and ended as the same cell run
  # without a stop: results and parameters exactly.
  assert restored[0] == (first, 1)
  assert _validated_epochs(first) == [1, 2]
  assert [r['epochs'] for r in rows] == [2, 2]
  uninterrupted = str(tmp_path / 'uninterrupted')
  reference_specs = grid.specs(grid.cells([TEST_CONFIG], ['pka']), range(1), uninterrupted,
                               [('max_epochs', '2'), ('patience', '5')])
  grid.run_grid(reference_specs, uninterrupted, 'reproduce')
  reference = reference_specs[0].workdir
  with open(os.path.join(first, 'results.json')) as f, \
       open(os.path.join(reference, 'results.json')) as g:
    assert json.load(f) == json.load(g)
  resumed_params, reference_params = (_latest_params(w) for w in (first, reference))
  for (path, a), (_, b) in zip(reference_params, resumed_params, strict=True):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

  def must_not_train(config, workdir):
    raise AssertionError(f'{workdir} was trained again')

  again = grid.run_grid(specs, root, 'reproduce', must_not_train)
  assert again == rows
  with open(os.path.join(root, 'runs.csv')) as f:
    read = list(csv.DictReader(f))
  assert [(r['cell'], int(r['seed'])) for r in read] == [('pka', 0), ('pka', 1)]
  for row, written in zip(rows, read):
    with open(os.path.join(row['workdir'], 'results.json')) as f:
      assert float(written['test/ndcg@10']) == pytest.approx(json.load(f)['test']['ndcg@10'])
  assert 'PKA' in open(os.path.join(root, 'table.md')).read()

  other = grid.specs(grid.cells([TEST_CONFIG], ['pka']), range(1), root,
                     [('max_epochs', '2'), ('patience', '5'), ('learning_rate', '0.5')])
  with pytest.raises(grid.GridMismatchError, match='learning_rate'):
    grid.run_grid(other, root, 'reproduce', must_not_train)


def test_runs_csv_has_one_row_per_run():
  text = grid.runs_csv([{'cell': 'pka', 'seed': 0}, {'cell': 'pka', 'seed': 1, 'extra': 2}])
  assert list(csv.DictReader(io.StringIO(text))) == [
      {'cell': 'pka', 'seed': '0', 'extra': ''}, {'cell': 'pka', 'seed': '1', 'extra': '2'}]
