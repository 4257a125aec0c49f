"""Figures of trained runs (PNG): PKA kernels, attention maps, training dynamics, grid results.

Made by the command line (pka_jax/figures.py):

  python -m pka_jax.figures --figure=all --root=runs/paper --dataset=synthetic --out=docs
  python -m pka_jax.figures --figure=kernels --workdirs=runs/paper/synthetic/pka/seed0 \
      --out=docs/kernels.png
  python -m pka_jax.figures --figure=attention --out=docs/attention.png \
      --workdirs=runs/paper/synthetic/pka/seed0,runs/paper/synthetic/sasrec/seed0
  python -m pka_jax.figures --figure=curves --out=docs/curves.png \
      --workdirs=runs/a/seed0,runs/a/seed1,runs/b/seed0 --labels=A,A,B
  python -m pka_jax.figures --figure=bars --root=runs/paper --out=docs/bars.png

The paper's Figure 1 is `kernels` (the trained U per block and L), Figure 2 `attention`,
Figure 3 `curves`. Runs are read from their best checkpoint. Each figure is a
`matplotlib.figure.Figure` of its own (no pyplot state to leak or close), written to a
temporary file and renamed, with the command that made it in the PNG's `Description`.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import matplotlib
from matplotlib import colors
from matplotlib.figure import Figure
import ml_collections
import numpy as np

from pka_jax import data
from pka_jax import files
from pka_jax.data.sequences import SplitDataset
from pka_jax.evaluation import protocol
from pka_jax.model.attention import make_kernel
from pka_jax.model.encoder import Encoder, ModelConfig
from pka_jax.paper import grid
from pka_jax.training import checkpoint

CMAP = 'viridis'  # reads in grey


def save(fig: Figure, path: str, command: str) -> None:
  """Writes `fig` as a PNG at `path` atomically, with `command` in its metadata."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.new_file(path) as tmp:
    fig.savefig(tmp, format='png', dpi=100, bbox_inches='tight',
                metadata={'Software': 'pka_jax', 'Description': command})


@dataclasses.dataclass(frozen=True)
class Trained:
  """What a figure needs of a run: its config, data and the parameters of its best step."""

  config: ml_collections.ConfigDict
  model_config: ModelConfig  # deterministic, plain attention (the path that has weights)
  dataset: SplitDataset
  params: dict
  best_step: int


def load_best(workdir: str) -> Trained:
  """The parameters of `workdir`'s best validation, restored alone: the optimiser state in
  the checkpoint may have another structure (another optimiser or code version)."""
  config = checkpoint.restore_config(workdir)
  dataset = data.load_dataset(config)
  model_config = dataclasses.replace(
      ModelConfig.from_config(config, dataset.num_items), deterministic=True,
      attention_impl='plain')
  target = checkpoint.params_target(config, dataset.num_items)
  best_step, params = checkpoint.restore_params(workdir, target, 'best')
  return Trained(config, model_config, dataset, params, best_step)


def run_label(config) -> str:
  label = grid.DISPLAY.get(config.model, config.model)
  layout = grid.layout_of(config) if config.model == 'pka' else None
  return f'{label} ({layout})' if layout and layout != 'toeplitz_full' else label


# ---- Figure 1: kernels ----

def kernel_matrices(config: ModelConfig, params) -> dict[str, np.ndarray]:
  """The trained kernels as the paper reads them: `U = Kᵀ` of the key side (logits ← logits·U),
  `L` of the value side (weights ← weights·L), and a query-side kernel, per block or shared."""
  matrices = {}
  for side, name in (('k', 'U'), ('v', 'L'), ('q', 'Q kernel')):
    kind = config.kernel_kind(side)
    if kind == 'none':
      continue
    module = make_kernel(kind, maxlen=config.maxlen, init_std=config.kernel_init_std,
                         learn_first=side == 'v', name=None)
    if config.kernel_shared(side):
      where = {'shared': params[f'shared_{side}_{kind}']}
    else:
      where = {f'block {i + 1}': params[f'block_{i}'][f'{side}_{kind}']
               for i in range(config.num_blocks)}
    for place, kernel_params in where.items():
      matrix_TxT = np.asarray(module.apply({'params': kernel_params}))
      matrices[f'{name} ({kind}), {place}'] = matrix_TxT.T if side == 'k' else matrix_TxT
  return matrices


def _mark_newest(ax, size: int) -> None:
  """Ticks at 0, the middle and T−1, the newest position (left padding), drawn dashed."""
  ticks = [0, size // 2, size - 1]
  labels = ['0', str(size // 2), f'{size - 1}\nnewest']
  ax.set_xticks(ticks, labels)
  ax.set_yticks(ticks, [*labels[:2], f'newest {size - 1}'])
  for line in (ax.axhline, ax.axvline):
    line(size - 1, color='white', linestyle='--', linewidth=0.8)


def newest_profile(name: str, matrix_TxT: np.ndarray) -> np.ndarray:
  """The newest position's kernel weights by distance `d = 0 .. T-1` back from it: column
  T−1 of an upper `U` (`U[T-1-d, T-1] = ĝ[d]` for a Toeplitz one), row T−1 of a lower kernel."""
  line = matrix_TxT[:, -1] if name.startswith('U') else matrix_TxT[-1]
  return line[::-1]


def kernels_figure(workdir: str, path: str, command: str) -> dict[str, np.ndarray]:
  """Heatmaps of every PKA kernel of `workdir`'s best checkpoint, and the newest position's
  weights by distance; returns the matrices."""
  trained = load_best(workdir)
  config = trained.model_config
  if config.position_mode != 'kernel':
    raise ValueError(f'{workdir} is not a PKA run (position_mode {config.position_mode!r})')
  matrices = kernel_matrices(config, jax.device_get(trained.params))
  fig = Figure(figsize=(3.3 * (len(matrices) + 1), 3.3), layout='constrained')
  axes = fig.subplots(1, len(matrices) + 1, squeeze=False)[0]
  for ax, (title, matrix) in zip(axes, matrices.items()):
    triangle = np.triu if title.startswith('U') else np.tril
    structural_zero = ~triangle(np.ones_like(matrix, bool))
    image = ax.imshow(np.where(structural_zero, np.nan, matrix), cmap=CMAP)
    fig.colorbar(image, ax=ax, shrink=0.8, label='weight')
    ax.set_title(title, fontsize=10)
    ax.set_xlabel('column: position')
    ax.set_ylabel('row: position')
    _mark_newest(ax, matrix.shape[0])
  profile_ax = axes[-1]
  ramp = np.linspace(0.0, 0.85, max(len(matrices), 2))
  for (title, matrix), shade in zip(matrices.items(), ramp):
    profile_ax.plot(newest_profile(title, matrix), color=matplotlib.colormaps[CMAP](shade),
                    label=title, marker='.', markersize=3)
  profile_ax.set(xlabel='distance back from the newest position', ylabel='weight',
                 title='Newest position (U: column T−1, L: row T−1)')
  profile_ax.title.set_fontsize(10)
  profile_ax.legend(fontsize=7)
  profile_ax.grid(alpha=0.3)
  fig.suptitle(f'{run_label(trained.config)} kernels, best checkpoint (step '
               f'{trained.best_step}); blank: zero by structure', fontsize=10)
  save(fig, path, command)
  return matrices


# ---- Figure 2: attention maps ----

def attention_maps(trained: Trained, max_sequences: int = 4096, batch_size: int = 256
                   ) -> np.ndarray:
  """`L×T×T` softmax weights of each block (mean over heads) averaged over the test windows.

  Row `i` is averaged over the windows where position `i` holds an item, so it sums to 1
  over its visible keys; keys never visible from row `i` (padding) and rows never real are
  NaN; future keys are 0.
  """
  config = trained.model_config
  model = Encoder(config)

  @jax.jit
  def weights(params, inputs_BxT):
    _, state = model.apply({'params': params}, inputs_BxT, mutable=['intermediates'])
    blocks = [state['intermediates'][f'block_{i}']['attention']['attention_weights'][0]
              for i in range(config.num_blocks)]
    return jnp.stack(blocks).mean(axis=2)  # L×B×T×T

  size, num_blocks = config.maxlen, config.num_blocks
  sums_LxTxT = np.zeros((num_blocks, size, size))
  rows_T = np.zeros(size)
  visible_TxT = np.zeros((size, size), bool)
  causal_TxT = np.tril(np.ones((size, size), bool))
  steps = protocol.successive_steps(trained.dataset, 'test', maxlen=size)
  for start in range(0, min(len(steps), max_sequences), batch_size):
    inputs_BxT = steps.batch(start, batch_size).inputs_BxT
    real_BxT = inputs_BxT != 0
    keys_BxT = real_BxT if config.mask_padding_keys else np.ones_like(real_BxT)
    weights_LxBxTxT = np.asarray(weights(trained.params, inputs_BxT), np.float64)
    sums_LxTxT += np.einsum('lbqt,bq->lqt', weights_LxBxTxT, real_BxT)
    rows_T += real_BxT.sum(axis=0)
    visible_TxT |= np.einsum('bq,bt->qt', real_BxT, keys_BxT) > 0
  with np.errstate(invalid='ignore', divide='ignore'):
    maps_LxTxT = sums_LxTxT / rows_T[None, :, None]
  shown = (visible_TxT | ~causal_TxT) & (rows_T[:, None] > 0)
  return np.where(shown[None], np.where(causal_TxT[None], maps_LxTxT, 0.0), np.nan)


def attention_figure(workdirs: Sequence[str], path: str, command: str,
                     labels: Sequence[str] | None = None,
                     max_sequences: int = 4096) -> dict[str, np.ndarray]:
  """One column per workdir, one row per block; returns the plotted `L×T×T` maps by label."""
  maps = {}
  for index, workdir in enumerate(workdirs):
    trained = load_best(workdir)
    label = labels[index] if labels else run_label(trained.config)
    maps[label] = attention_maps(trained, max_sequences)
  num_blocks = max(m.shape[0] for m in maps.values())
  fig = Figure(figsize=(2.9 * len(maps) + 1.0, 2.8 * num_blocks), layout='constrained')
  axes = fig.subplots(num_blocks, len(maps), squeeze=False)
  top = max(np.nanmax(m) for m in maps.values())
  norm = colors.PowerNorm(gamma=0.5, vmin=0.0, vmax=top)  # low weights stay visible
  for column, (label, maps_LxTxT) in enumerate(maps.items()):
    for block in range(num_blocks):
      ax = axes[block, column]
      if block >= maps_LxTxT.shape[0]:
        ax.set_axis_off()
        continue
      image = ax.imshow(maps_LxTxT[block], cmap=CMAP, norm=norm)
      ax.set_title(f'{label}, block {block + 1}', fontsize=10)
      ax.set_xlabel('key position')
      ax.set_ylabel('query position')
      _mark_newest(ax, maps_LxTxT.shape[-1])
  fig.colorbar(image, ax=axes, shrink=0.6, label='mean attention weight (sqrt scale)')
  fig.suptitle('Attention weights averaged over the test windows (blank: padding)',
               fontsize=10)
  save(fig, path, command)
  return maps


# ---- Figure 3: training dynamics ----

def training_curves(workdir: str) -> dict[str, np.ndarray]:
  """Validation NDCG@10 per epoch and train loss at fractional epochs, from metrics.jsonl
  (a step recorded twice keeps its last record)."""
  valid, loss = {}, {}
  for record in grid.read_metrics(workdir):
    if 'valid/ndcg@10' in record:
      valid[record['step']] = (record['epoch'], record['valid/ndcg@10'])
    if 'train/loss' in record:
      loss[record['step']] = record['train/loss']
  if not valid:
    raise FileNotFoundError(f'No validation record in {os.path.join(workdir, "metrics.jsonl")}')
  steps = np.array(sorted(valid))
  epochs = np.array([valid[s][0] for s in steps], np.float64)
  loss_steps = np.array(sorted(loss), np.float64)
  return {'epoch': epochs, 'valid_ndcg': np.array([valid[s][1] for s in steps]),
          'loss_epoch': np.interp(loss_steps, np.r_[0, steps], np.r_[0, epochs]),
          'loss': np.array([loss[s] for s in sorted(loss)])}


def _mean_band(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]):
  """Mean, min and max over runs at each x that every run reached."""
  common = sorted(set.intersection(*(set(np.round(x, 6)) for x in xs)))
  table = np.array([[y[np.round(x, 6) == c][-1] for c in common] for x, y in zip(xs, ys)])
  return np.array(common), table.mean(0), table.min(0), table.max(0)


def curves_figure(workdirs: Sequence[str], path: str, command: str,
                  labels: Sequence[str] | None = None) -> dict[str, list[dict]]:
  """Validation NDCG@10 and train loss against epoch; runs sharing a label (seeds) drawn as
  their mean with a min–max band. Returns the curves by label."""
  groups: dict[str, list[dict]] = {}
  for index, workdir in enumerate(workdirs):
    label = labels[index] if labels else run_label(checkpoint.restore_config(workdir))
    groups.setdefault(label, []).append(training_curves(workdir))
  fig = Figure(figsize=(10, 3.6), layout='constrained')
  ax_valid, ax_loss = fig.subplots(1, 2)
  ramp = np.linspace(0.0, 0.85, max(len(groups), 2))  # viridis without its palest yellow
  for (label, runs), shade in zip(groups.items(), ramp):
    color = matplotlib.colormaps[CMAP](shade)
    for ax, x_key, y_key in ((ax_valid, 'epoch', 'valid_ndcg'), (ax_loss, 'loss_epoch', 'loss')):
      x, mean, low, high = _mean_band([r[x_key] for r in runs], [r[y_key] for r in runs])
      ax.plot(x, mean, color=color, label=f'{label} ({len(runs)} run{"s" * (len(runs) > 1)})')
      if len(runs) > 1:
        ax.fill_between(x, low, high, color=color, alpha=0.25, linewidth=0)
  ax_valid.set(xlabel='epoch', ylabel='validation NDCG@10', title='Validation NDCG@10')
  ax_loss.set(xlabel='epoch', ylabel='train loss (cross-entropy, nats)', title='Train loss')
  ax_valid.legend(fontsize=8)
  for ax in (ax_valid, ax_loss):
    ax.grid(alpha=0.3)
  fig.suptitle('Training dynamics (mean over seeds; band: min–max)', fontsize=10)
  save(fig, path, command)
  return groups


# ---- the grid's results ----

def read_runs_csv(path: str) -> list[dict]:
  with open(path) as f:
    return list(csv.DictReader(f))


def cell_label(cell: str) -> str:
  """`pka-k_only` -> `PKA k_only`, `sasrec` -> `SASRec`."""
  model, _, layout = cell.partition('-')
  return ' '.join([grid.DISPLAY.get(model, model), *([layout] if layout else [])])


def bars_figure(rows: Sequence[dict], path: str, command: str, metric: str = 'test/ndcg@10'
                ) -> dict[tuple[str, str], tuple[float, float]]:
  """Per dataset, the mean `metric` of each cell with its 95% Student-t interval over seeds
  and the seeds as dots; returns `{(dataset, cell): (mean, half-width)}`."""
  values: dict[str, dict[str, list[float]]] = {}
  for row in rows:
    values.setdefault(row['dataset'], {}).setdefault(row['cell'], []).append(float(row[metric]))
  widest = max(len(cells) for cells in values.values())
  fig = Figure(figsize=(max(4.0, 0.8 * widest + 1.5), 3.4 * len(values)), layout='constrained')
  axes = fig.subplots(len(values), 1, squeeze=False)[:, 0]
  summary = {}
  for ax, (dataset, cells) in zip(axes, values.items()):
    for x, (cell, seeds) in enumerate(cells.items()):
      mean, half = grid.interval(seeds)
      summary[(dataset, cell)] = mean, half
      shade = 0.3 if cell.startswith('pka') else 0.75  # PKA and its layouts apart
      ax.bar(x, mean, color=matplotlib.colormaps[CMAP](shade), width=0.7)
      if not np.isnan(half):
        ax.errorbar(x, mean, yerr=half, color='black', capsize=4, linewidth=1)
      ax.plot(np.full(len(seeds), x), seeds, 'o', color='white', markeredgecolor='black',
              markersize=3.5)
    ax.set_xticks(range(len(cells)), [cell_label(c) for c in cells], rotation=30, ha='right')
    ax.set_ylabel(metric.replace('test/', 'test ').upper().replace('TEST', 'test'))
    ax.set_title(f'{dataset}: mean over seeds, 95% Student-t interval, dots: seeds',
                 fontsize=10)
    ax.grid(axis='y', alpha=0.3)
  save(fig, path, command)
  return summary


def all_figures(root: str, out_dir: str, command: str, dataset: str | None = None,
                max_sequences: int = 4096) -> list[str]:
  """The four figures of each dataset of a grid (`<out_dir>/<dataset>_<figure>.png`): kernels
  of PKA's first seed, attention maps of each model's first seed, curves of every model
  (seeds averaged), bars of every cell."""
  rows = read_runs_csv(os.path.join(root, 'runs.csv'))
  written = []
  for name in dict.fromkeys(r['dataset'] for r in rows):
    if dataset not in (None, name):
      continue
    mine = [r for r in rows if r['dataset'] == name]
    models = [r for r in mine if not r['layout']]
    first = {}  # each model's first seed
    for row in sorted(models, key=lambda r: int(r['seed'])):
      first.setdefault(row['cell'], row['workdir'])
    paths = {f: os.path.join(out_dir, f'{name}_{f}.png')
             for f in ('kernels', 'attention', 'curves', 'bars')}
    if 'pka' in first:
      kernels_figure(first['pka'], paths['kernels'], command)
      written.append(paths['kernels'])
    attention_figure(list(first.values()), paths['attention'], command,
                     max_sequences=max_sequences)
    curves_figure([r['workdir'] for r in models], paths['curves'], command)
    bars_figure(mine, paths['bars'], command)
    written += [paths['attention'], paths['curves'], paths['bars']]
  return written
