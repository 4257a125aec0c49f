"""The benchmarks run on the tiny config and write the figures other tools read:
experiments.speed.benchmark with experiments.speed.trace_breakdown on its trace, and
experiments.kernels.benchmark for each kernel."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from configs import test as test_config
from pka_jax.model import encoder
from pka_jax.model import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_writes_its_json_contract(tmp_path):
  out = tmp_path / 'bench.json'
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.speed.benchmark', '--config=configs/test.py',
       f'--config.data_dir={tmp_path / "data"}', f'--workdir={tmp_path / "work"}',
       '--steps=3', '--warmup=1', '--eval_repeats=1', '--epochs=1', f'--json={out}',
       '--cpu_devices=2',  # XLA counts one device's FLOPs: the figures must add them up
       '--probe_size=256',  # the peak of smaller matmuls: lower, and quicker to time
       f'--profile_dir={tmp_path / "trace"}',
       '--verbosity=0'],  # its stages logged, so a crash's output says where it was
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
  report = json.loads(out.read_text())
  assert report['device'].startswith('cpu') and report['device'].endswith('x2')
  assert report['peak_flops']['float32'] > 0 and report['peak_flops']['bfloat16'] > 0
  assert report['peak_probe_size'] == 256
  train_figures, eval_figures = report['train'], report['eval']
  assert train_figures['step_seconds_min'] <= train_figures['step_seconds']
  assert train_figures['step_seconds'] <= train_figures['step_seconds_max']
  # The FLOPs are the library's formula for this config; XLA's count adds the elementwise
  # work, a large share at this tiny width (flops_test checks the two at a real one).
  config = test_config.get_config()
  model_config = encoder.create_model(config, 60, deterministic=False).config
  assert 0 < train_figures['real_targets'] < config.batch_size * config.maxlen
  # Histories of 8-20 items: every batch needs its 16 columns, in one program (too few
  # positions for microbatches).
  assert not train_figures['sorted_microbatches']
  assert train_figures['widths_per_step'] == {'16': 1}
  assert train_figures['model_flops'] == pytest.approx(flops.train_step_flops(
      model_config, config.batch_size, real_targets=train_figures['real_targets']), rel=1e-9)
  full = flops.train_step_flops(model_config, config.batch_size)
  assert train_figures['model_flops_full_windows'] == full > train_figures['model_flops']
  assert train_figures['xla_flops'] > full
  assert eval_figures['pairs'] > 0 and eval_figures['pairs_per_second'] > 0
  # Every pair is counted once, at the width of the window its batch ran in.
  at_width = {int(width): pairs for width, pairs in eval_figures['pairs_at_width'].items()}
  assert sum(at_width.values()) == eval_figures['pairs']
  assert set(at_width) <= {8, 16}  # window_width's choices at maxlen 16
  assert eval_figures['model_flops'] == sum(
      pairs * flops.eval_pair_flops(model_config, width) for width, pairs in at_width.items())
  assert eval_figures['model_flops_per_pair'] == flops.eval_pair_flops(model_config)
  # Every MFU is model FLOPs over seconds over the measured peak of the config's dtype,
  # recomputed here from the report's own figures, and a share of that peak.
  peak = report['peak_flops'][report['config']['dtype']]
  assert train_figures['mfu'] == pytest.approx(
      train_figures['model_flops'] / train_figures['step_seconds'] / peak, rel=1e-9)
  assert train_figures['back_to_back_step_seconds'] > 0
  assert train_figures['back_to_back_mfu'] == pytest.approx(
      train_figures['model_flops'] / train_figures['back_to_back_step_seconds'] / peak,
      rel=1e-9)
  assert train_figures['sequences_per_second'] == pytest.approx(
      config.batch_size / train_figures['step_seconds'], rel=1e-9)
  eval_seconds = eval_figures['pairs'] / eval_figures['pairs_per_second']
  assert eval_figures['mfu'] == pytest.approx(
      eval_figures['model_flops'] / eval_seconds / peak, rel=1e-9)
  assert eval_figures['device_mfu'] == pytest.approx(
      eval_figures['device_pairs_per_second'] * eval_figures['model_flops_per_pair'] / peak,
      rel=1e-9)
  # The probed MFUs divide each timing by a peak probed beside it, which the report keeps
  # no record of: only their range is checked.
  for figures, names in ((train_figures, ('mfu', 'back_to_back_mfu', 'mfu_probed')),
                         (eval_figures, ('mfu', 'device_mfu', 'mfu_probed'))):
    for name in names:
      assert 0 < figures[name] < 1, (name, figures[name])
  assert len(report['epochs']['epochs']) == 1
  # The epoch's own batches timed alone, to set its loop's time against.
  assert len(report['epochs']['steps_seconds']) == 1 and report['epochs']['steps_seconds'][0] > 0
  assert 'MFU' in result.stdout and 'pairs/s' in result.stdout
  # A trace that profilers read: the XSpace protobuf of the traced steps.
  assert report['profile_dir'] == str(tmp_path / 'trace')
  assert list((tmp_path / 'trace').glob('plugins/profile/*/*.xplane.pb'))
  # Beside it, the HLO of the traced step: every traced op of the step is one of its own.
  breakdown = subprocess.run(
      [sys.executable, '-m', 'experiments.speed.trace_breakdown', str(tmp_path / 'trace')],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert breakdown.returncode == 0, breakdown.stderr[-3000:]
  matched = re.search(r'([\d.]+)% of the time matched', breakdown.stdout)
  assert matched and float(matched.group(1)) >= 99.0, breakdown.stdout
  part_lines = {line.split()[0]: line.split()[1:3] for line in breakdown.stdout.splitlines()
                if line.startswith(('loss ', 'encoder/block/attention '))}
  assert float(part_lines['loss'][0].replace(',', '')) > 0
  assert all(float(t.replace(',', '')) > 0 for t in part_lines['encoder/block/attention'])


def test_loss_benchmark_times_each_variant_and_checks_it_against_the_default(tmp_path):
  out = tmp_path / 'loss.json'
  result = loss_benchmark('--tilings=16x32x4x2,32x16x4x2', f'--json={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  variants = report['variants']
  assert list(variants) == ['chunked', 'full', 'pallas 16x32x4x2', 'pallas 32x16x4x2']
  assert report['model_flops'] == 3 * 2 * 200 * 70 * 24
  for name in ('full', 'pallas 16x32x4x2', 'pallas 32x16x4x2'):
    figures = variants[name]
    assert figures['back_to_back_seconds'] > 0 and figures['mfu'] > 0
    assert max(figures['difference'].values()) < 1e-5, (name, figures['difference'])


def test_loss_benchmark_refuses_a_tile_that_is_no_power_of_two():
  result = loss_benchmark('--tilings=16x32x4x2,24x16x4x2')
  assert result.returncode != 0
  assert "--tilings: '24x16x4x2' is not" in result.stderr
  assert 'Traceback' not in result.stderr


def loss_benchmark(*flags):
  return run_module('kernels.benchmark', '--kernel=loss', '--rows=200', '--items=70',
                    '--width=24', '--dtype=float32', '--steps=2', '--interpret',
                    '--probe_size=256', *flags)


def test_benchmark_refuses_a_config_this_backend_cannot_run_in_one_line(tmp_path):
  result = run_module('speed.benchmark', '--config=configs/test.py', '--config.ce_impl=pallas',
                      f'--config.data_dir={tmp_path / "data"}', f'--workdir={tmp_path}')
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('invalid configuration (1 problem): ce_impl:'), last


def run_module(name, *flags):
  """experiments.`name` with `flags`, in a process of its own at the repository's root."""
  return subprocess.run([sys.executable, '-m', f'experiments.{name}', *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def kernel_benchmark(kernel, *flags):
  return run_module('kernels.benchmark', f'--kernel={kernel}', *flags)


def pallas_figures(tmp_path, kernel, baseline, *flags):
  """The Pallas kernels' figures from the kernel benchmark of `kernel` run in the
  interpreter for 2 steps: it timed the baseline, then the kernels."""
  out = tmp_path / 'report.json'
  result = kernel_benchmark(kernel, *flags, '--steps=2', '--interpret', f'--json={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert list(report['implementations']) == [baseline, 'pallas']
  pallas = report['implementations']['pallas']
  assert pallas['back_to_back_seconds'] > 0
  return pallas


def test_attention_benchmark_times_both_paths_and_checks_the_kernel_against_plain(tmp_path):
  pallas = pallas_figures(tmp_path, 'attention', 'plain', '--batch=4',
                          '--maxlen=16', '--width=32', '--heads=2', '--dtype=float32')
  assert max(pallas['difference'].values()) < 1e-5, pallas['difference']


def test_layer_norm_benchmark_times_both_and_checks_the_kernels_against_flax(tmp_path):
  pallas = pallas_figures(tmp_path, 'layer_norm', 'xla', '--rows=96',
                          '--width=32', '--dtype=float32')
  assert max(pallas['difference'].values()) < 1e-5, pallas['difference']
  assert set(pallas['difference']) == {'value', 'rows', 'scale', 'bias'}


def test_ffn_benchmark_times_both_and_checks_the_kernels_against_xla(tmp_path):
  pallas = pallas_figures(tmp_path, 'ffn', 'xla', '--batch=4', '--maxlen=16',
                          '--width=16', '--blocks=2', '--items=30', '--dtype=float32')
  assert set(pallas['difference']) == {'outputs', 'gradients'}
  assert max(pallas['difference'].values()) < 1e-5, pallas['difference']


def test_ffn_benchmark_refuses_shapes_the_kernels_cannot_take():
  result = kernel_benchmark('ffn', '--batch=3', '--maxlen=10', '--width=16', '--interpret')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert '--batch=3 --maxlen=10' in result.stderr


def test_layer_norm_benchmark_refuses_rows_the_kernels_cannot_take():
  result = kernel_benchmark('layer_norm', '--rows=100', '--interpret')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert '--rows=100' in result.stderr


@pytest.mark.parametrize('kernel, flags, message', [
    ('attention', ('--maxlen=10', '--interpret'), '--maxlen=10 --width=128 --heads=1'),
    ('attention', ('--rows=100',), '--rows: not a flag of --kernel=attention'),
    ('loss', ('--blocks=2',), '--blocks: not a flag of --kernel=loss'),
])
def test_kernel_benchmark_refuses_in_one_line(kernel, flags, message):
  result = kernel_benchmark(kernel, *flags)
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert message in result.stderr.strip().splitlines()[-1], result.stderr[-3000:]


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='the kernels run on a GPU')
def test_off_a_gpu_without_interpret_only_the_xla_path_runs(tmp_path):
  # 100 rows the kernels could not take: not refused, since they do not run.
  out = tmp_path / 'report.json'
  result = kernel_benchmark('layer_norm', '--rows=100', '--width=32', '--dtype=float32',
                            '--steps=1', f'--json={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'pallas  skipped' in result.stdout
  assert list(json.loads(out.read_text())['implementations']) == ['xla']
