"""The command line as a user runs it: train, evaluate, and a dataset that is not there."""

import gc
import os
import subprocess
import sys

import pytest

from configs import test as test_config
from pka_jax import cli
from pka_jax import config_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, env=None):
  env = {**os.environ, 'PKA_JAX_NO_DOWNLOAD': '1', **(env or {})}
  return subprocess.run([sys.executable, '-m', 'pka_jax.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_train_then_eval_print_the_same_test_metrics(tmp_path):
  """Trained by default on one device of a CPU split in one per core and validated on all of
  them, then tested again on a single device: the checkpoint moves between layouts, and the
  ranking does not depend on how the rows were split."""
  common = ['--config=configs/test.py', f'--workdir={tmp_path}/run',
            f'--config.data_dir={tmp_path}/data', '--config.max_epochs=2']
  trained = run_main(*common)
  assert trained.returncode == 0, trained.stderr[-3000:]
  split = config_check.cpu_devices_for([test_config.get_config()])
  assert f'{split} local cpu device(s)' in trained.stderr
  if split > 1:
    assert f'Training on 1 of the {split} devices, evaluating on all.' in trained.stderr
  evaluated = run_main(*common, '--mode=eval', '--cpu_devices=1')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert '1 local cpu device(s)' in evaluated.stderr
  table = [line for line in trained.stdout.splitlines() if line.startswith('pka ')]
  assert [line.split()[1] for line in table] == ['valid', 'test']
  assert table == [line for line in evaluated.stdout.splitlines() if line.startswith('pka ')]


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_missing_dataset_explains_where_to_put_it(tmp_path, mode):
  data_dir = tmp_path / 'data'
  result = run_main('--config=configs/ml1m.py', f'--workdir={tmp_path}/run',
                    f'--config.data_dir={data_dir}', f'--mode={mode}')
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  assert 'ml-1m.zip' in result.stderr and str(data_dir / 'ml1m') in result.stderr


def test_a_bad_configuration_is_one_line_naming_every_field(tmp_path):
  result = run_main('--config=configs/test.py', f'--workdir={tmp_path}/run',
                    f'--config.data_dir={tmp_path}/data', '--config.maxlen=1',
                    '--config.dropout=1.5')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith('error: invalid configuration (2 problems): ')
  assert 'maxlen: expected an integer >= 2, got 1' in line and 'dropout: ' in line
  assert not os.path.exists(tmp_path / 'run') and not os.path.exists(tmp_path / 'data')


def test_an_unwritable_workdir_is_reported_before_any_work(tmp_path):
  (tmp_path / 'a_file').write_text('')
  result = run_main('--config=configs/test.py', f'--workdir={tmp_path}/a_file/run',
                    f'--config.data_dir={tmp_path}/data')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      f'error: cannot write to the workdir {tmp_path}/a_file/run')
  assert not os.path.exists(tmp_path / 'data')  # nothing was prepared


def test_verbosity_shows_the_traceback_of_a_user_error(tmp_path):
  result = run_main('--config=configs/test.py', f'--workdir={tmp_path}/run',
                    '--config.maxlen=1', '--verbosity=1')
  assert result.returncode != 0
  assert 'Traceback' in result.stderr and 'ConfigError' in result.stderr


def one_line_error(result) -> str:
  assert result.returncode == 1, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize('flag, expected', [
    ('--config.lr=1', "error: --config.lr: the config has no field 'lr'; did you mean "
                      'learning_rate?'),
    ('--config.num_block=3', "error: --config.num_block: the config has no field "
                             "'num_block'; did you mean num_blocks"),
    ('--config.synthetic.num_item=3', "error: --config.synthetic.num_item: the config has no "
                                      "field 'synthetic.num_item'; did you mean "
                                      'synthetic.num_items'),
    ('--config.learning_rate=abc', "error: flag --config.learning_rate=abc: could not "
                                   "convert string to float: 'abc'"),
])
def test_a_mistake_in_a_config_flag_is_one_line(tmp_path, flag, expected):
  result = run_main('--config=configs/test.py', flag, f'--workdir={tmp_path}/run')
  assert one_line_error(result).startswith(expected)
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('command, flags, message', [
    ('pka_jax.main', ['--config=configs/test.py', '--config.lr=1', '--workdir={tmp}/run'],
     "error: --config.lr: the config has no field 'lr'"),
    ('pka_jax.tune', ['--config=configs/test.py', '--root={tmp}/tune', '--trials=0'],
     'error: flag --trials=0: 0 is not a positive integer'),
])
def test_a_mistake_in_the_flags_is_reported_before_jax_loads(tmp_path, command, flags, message):
  # The command's own imports wait for its flags: a typo is answered at once.
  modules = tmp_path / 'modules.txt'
  script = ('import atexit, runpy, sys\n'
            f'atexit.register(lambda: open({str(modules)!r}, "w").write(" ".join(sys.modules)))\n'
            f'sys.argv[0] = {command!r}\n'
            f"runpy.run_module({command!r}, run_name='__main__', alter_sys=True)\n")
  result = subprocess.run([sys.executable, '-c', script, *(f.format(tmp=tmp_path) for f in flags)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert one_line_error(result).startswith(message)
  loaded = modules.read_text().split()
  assert 'pka_jax.cli' in loaded and 'jax' not in loaded


@pytest.mark.parametrize('enabled', [True, False])
def test_a_command_s_imports_pause_the_collector_and_end_frozen(enabled):
  # What cli.importing promises main(): no collection while the imports load, what they made
  # kept out of later passes, and the collector left as the caller had it.
  was = gc.isenabled()
  try:
    (gc.enable if enabled else gc.disable)()
    frozen = gc.get_freeze_count()
    with cli.importing():
      paused = not gc.isenabled()
      made = [[] for _ in range(100)]
    assert paused and gc.isenabled() == enabled
    assert gc.get_freeze_count() >= frozen + len(made)
  finally:
    (gc.enable if was else gc.disable)()


@pytest.mark.parametrize('config, expected', [
    ('configs/no_such_file.py', "No such file or directory: 'configs/no_such_file.py'"),
    ('configs/test.py:model=bert', 'Config variant model=bert: expected one of'),
])
def test_a_config_file_that_cannot_load_is_one_line(tmp_path, config, expected):
  result = run_main(f'--config={config}', f'--workdir={tmp_path}/run')
  assert expected in one_line_error(result)


def test_a_bucket_url_workdir_is_refused_before_any_work(tmp_path):
  result = run_main('--config=configs/test.py', '--workdir=gs://bucket/run',
                    f'--config.data_dir={tmp_path}/data')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      'error: the workdir gs://bucket/run is a URL') and 'gcsfuse' in result.stderr
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))
  assert not os.path.exists(tmp_path / 'data')


def test_a_cpu_split_the_user_made_is_kept_and_the_item_table_splits_over_it(tmp_path):
  # The user's split, beside the suite's own compile flags (conftest).
  user_split = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=8"
  result = run_main('--config=configs/test.py', '--config.mesh_model=4',
                    '--config.max_epochs=1', f'--workdir={tmp_path}/run',
                    f'--config.data_dir={tmp_path}/data', env={'XLA_FLAGS': user_split})
  assert result.returncode == 0, result.stderr[-3000:]
  assert '8 local cpu device(s)' in result.stderr
  assert 'Training mesh: data 2 x model 4' in result.stderr
