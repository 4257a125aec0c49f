"""Figures from a trained configs/test.py workdir: non-empty PNGs with their command, and the
plotted arrays checked for meaning (kernel structure, attention rows, curves, intervals)."""

import os

import numpy as np
from PIL import Image
import pytest

from pka_jax import data
from pka_jax.evaluation import protocol
from pka_jax.paper import figures
from pka_jax.paper import grid
from pka_jax.training import checkpoint


@pytest.fixture(scope='module')
def workdir(trained_test_run):
  return trained_test_run.workdir


def _check_png(path: str, command: str) -> None:
  assert os.path.getsize(path) > 1000
  with Image.open(path) as image:
    assert image.format == 'PNG' and min(image.size) > 100
    assert image.info['Description'] == command
  assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temporary left


def test_kernels_figure_shows_u_upper_toeplitz_and_l_lower(workdir, tmp_path):
  path = str(tmp_path / 'kernels.png')
  matrices = figures.kernels_figure(workdir, path, 'make kernels')
  _check_png(path, 'make kernels')
  # configs/test.py: 2 blocks, Toeplitz keys per block, one full value kernel shared.
  assert list(matrices) == ['U (toeplitz), block 1', 'U (toeplitz), block 2', 'L (full), shared']
  for name, matrix in matrices.items():
    size = matrix.shape[0]
    if name.startswith('U'):
      np.testing.assert_array_equal(np.tril(matrix, -1), 0.0)  # U = Tkᵀ: upper triangular
      for offset in range(size):  # constant along each diagonal: depends on distance only
        diagonal = np.diag(matrix, offset)
        np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-6)
      first_row = matrix[0]
      assert first_row[0] > 0 and np.linalg.norm(first_row) == pytest.approx(1.0, rel=1e-5)
    else:
      np.testing.assert_array_equal(np.triu(matrix, 1), 0.0)  # L: lower triangular
      assert np.linalg.norm(matrix) == pytest.approx(1.0, rel=1e-5)  # Frobenius-normalised


def test_attention_maps_sum_to_one_over_visible_keys_and_are_zero_on_future_keys(
    workdir, tmp_path):
  path = str(tmp_path / 'attention.png')
  maps = figures.attention_figure([workdir, workdir], path, 'make attention', ['A', 'B'])
  _check_png(path, 'make attention')
  assert list(maps) == ['A', 'B']
  maps_LxTxT = maps['A']
  num_blocks, size, _ = maps_LxTxT.shape
  assert (num_blocks, size) == (2, 16)
  np.testing.assert_array_equal(maps['B'], maps_LxTxT)
  future = np.triu(np.ones((size, size), bool), 1)
  rows_shown = ~np.isnan(maps_LxTxT[0]).all(axis=1)
  assert rows_shown[-1]  # the newest position is always real
  for block in maps_LxTxT:
    np.testing.assert_array_equal(block[rows_shown][future[rows_shown]], 0.0)
    visible = block[rows_shown]
    np.testing.assert_allclose(np.nansum(visible, axis=1), 1.0, rtol=1e-5)
    assert (np.nan_to_num(visible) >= 0).all()
  # Blank cells are exactly the keys that were padding in every window with a real query.
  steps = protocol.successive_steps(data.load_dataset(checkpoint.restore_config(workdir)),
                                    'test', maxlen=size)
  inputs = np.concatenate([b.inputs_BxT for b in steps.batches(256)])
  real = inputs != 0
  ever_visible = np.einsum('bq,bt->qt', real, real) > 0
  blank = np.isnan(maps_LxTxT[0])
  np.testing.assert_array_equal(blank[rows_shown], ~(ever_visible | future)[rows_shown])


def test_curves_figure_has_one_point_per_validation(workdir, tmp_path):
  path = str(tmp_path / 'curves.png')
  groups = figures.curves_figure([workdir, workdir], path, 'make curves', ['PKA', 'PKA'])
  _check_png(path, 'make curves')
  assert len(groups['PKA']) == 2
  curves = groups['PKA'][0]
  np.testing.assert_array_equal(curves['epoch'], [1, 2])
  history = [r for r in grid.read_metrics(workdir) if 'valid/ndcg@10' in r]
  np.testing.assert_allclose(curves['valid_ndcg'], [r['valid/ndcg@10'] for r in history])
  assert len(curves['loss']) > 0 and (curves['loss'] > 0).all()
  assert 0 < curves['loss_epoch'].min() and curves['loss_epoch'].max() <= 2


def test_bars_figure_shows_the_interval_over_seeds(tmp_path):
  rows = [{'dataset': 'toy', 'cell': cell, 'test/ndcg@10': str(value)}
          for cell, values in (('pka', (0.40, 0.42, 0.44)), ('nope', (0.2, 0.2, 0.2)))
          for value in values]
  path = str(tmp_path / 'bars.png')
  summary = figures.bars_figure(rows, path, 'make bars')
  _check_png(path, 'make bars')
  mean, half = summary[('toy', 'pka')]
  assert mean == pytest.approx(0.42) and half == pytest.approx(0.049683, abs=1e-6)
  assert summary[('toy', 'nope')] == pytest.approx((0.2, 0.0))


def test_all_figures_of_a_grid_root(workdir, tmp_path):
  root = tmp_path / 'root'
  root.mkdir()
  row = {'dataset': 'test', 'cell': 'pka', 'model': 'pka', 'layout': '', 'seed': '0',
         'test/ndcg@10': '0.1', 'workdir': workdir}
  (root / 'runs.csv').write_text(grid.runs_csv([row]))
  written = figures.all_figures(str(root), str(tmp_path / 'out'), 'make all')
  assert sorted(os.path.basename(p) for p in written) == [
      'test_attention.png', 'test_bars.png', 'test_curves.png', 'test_kernels.png']
  for path in written:
    with Image.open(path) as image:
      assert image.info['Description'] == 'make all'
