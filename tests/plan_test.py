"""experiments.scale.plan: a train step's per-device bytes on a mesh of simulated CPU devices or
a Cloud TPU slice's chips, compiled without the machines."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None


def plan(tmp_path, *flags) -> dict:
  out = tmp_path / 'plan.json'
  result = run_plan(*flags, f'--json={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(out.read_text())


def run_plan(*flags):
  return subprocess.run([sys.executable, '-m', 'experiments.scale.plan', *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False)


def test_splitting_the_item_table_over_the_model_axis_halves_each_devices_share(tmp_path):
  shape = ('--config=configs/test.py', '--num_items=60', '--devices=4')
  whole = plan(tmp_path, *shape, '--config.mesh_model=1')
  split = plan(tmp_path, *shape, '--config.mesh_model=2')
  assert (whole['mesh'], split['mesh']) == ({'data': 4, 'model': 1}, {'data': 2, 'model': 2})
  assert whole['hosts'] == split['hosts'] == 1
  row = 16 * 4  # a float32 row of the table: configs/test.py's d is 16
  # 60 items and the padding row; split, the 61 rows are padded to 62 and halved.
  assert whole['per_device_bytes']['item_table'] == 61 * row
  assert split['per_device_bytes']['item_table'] == 31 * row
  for figures in (whole, split):
    bytes_ = figures['per_device_bytes']
    # Adam's two moments of every parameter, and a few scalar counters.
    assert 2 * bytes_['parameters'] <= bytes_['optimizer'] <= 2 * bytes_['parameters'] + 64
    assert bytes_['arguments'] >= bytes_['parameters'] + bytes_['optimizer']
  assert (whole['per_device_bytes']['parameters'] - split['per_device_bytes']['parameters']
          == 30 * row)
  # Evaluation holds the parameters (and a batch), not the optimizer's state.
  for figures in (whole, split):
    held = figures['eval']['per_device_bytes']['arguments']
    assert figures['per_device_bytes']['parameters'] <= held
    assert held < figures['per_device_bytes']['parameters'] + figures['per_device_bytes'][
        'optimizer']


def test_a_mesh_that_does_not_divide_the_devices_is_refused_in_one_line():
  result = run_plan('--config=configs/test.py', '--num_items=60', '--devices=3',
                    '--config.mesh_model=2')
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('invalid configuration') and 'mesh_model: expected a divisor' in last


@pytest.mark.skipif(HAS_LIBTPU, reason='libtpu is installed')
def test_without_libtpu_a_tpu_plan_names_the_package_to_install_in_one_line():
  result = run_plan('--config=configs/test.py', '--num_items=60', '--tpu=v5e:2x2')
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith("compiling for a TPU needs libtpu: pip install 'libtpu")


@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed')
def test_ml1m_step_compiles_for_a_two_host_tpu_slice_with_the_table_split_or_not(tmp_path):
  shape = ('--config=configs/ml1m.py', '--num_items=3416', '--config.dtype=bfloat16',
           '--tpu=v5p:2x2x2')
  whole = plan(tmp_path, *shape, '--config.mesh_model=1')
  split = plan(tmp_path, *shape, '--config.mesh_model=2')
  assert (whole['devices'], whole['hosts'], whole['backend']) == (8, 2, 'tpu')
  assert split['mesh'] == {'data': 4, 'model': 2}
  # Each chip holds half the float32 table (3,417 rows of 128) and of its two Adam moments.
  saved = (whole['per_device_bytes']['arguments']
           - split['per_device_bytes']['arguments'])
  assert saved == pytest.approx(3 * 3417 * 128 * 4 / 2, rel=0.02)
  # The evaluation step compiles there too, in an accelerator's batches.
  assert whole['eval']['batch_size'] == split['eval']['batch_size'] == 4096
