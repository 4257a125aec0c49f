"""Grids of runs (datasets × models × PKA kernel layouts × seeds) and their tables over seeds.

A run lives in `<root>/<dataset>/<model>[-<layout>]/seed<k>`, where `<dataset>` is the stem of
its config file (`configs/ml1m.py` -> `ml1m`). Seed `k` sets `config.seed` (parameters, dropout
and data order) and nothing else: the synthetic generator's seed stays fixed, so every seed
sees the same data. A run with `results.json` is read back; one with checkpoints only is
resumed by `jobs.train`; either way its saved config must match the cell's.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence

from absl import logging
import ml_collections
import numpy as np

from configs import default
from pka_jax import config_files
from pka_jax import files
from pka_jax import jobs
from pka_jax.training import checkpoint

METRICS = ('ndcg@10', 'hr@10', 'mrr@10', 'cov@10')
DISPLAY = {'pka': 'PKA', 'sasrec': 'SASRec', 'nope': 'NoPE', 'all_ape': 'ALL-APE',
           'rope': 'RoPE', 'cope': 'CoPE'}
# Fields that change neither the parameters nor the metrics of a run (exact reformulations,
# logging, paths): a finished run is still valid when only these differ.
BOOKKEEPING_FIELDS = frozenset({'data_dir', 'log_every_steps', 'checkpoint_every_steps',
                                'checkpoint_interval_s', 'eval_batch_size', 'ce_block_size',
                                'ce_chunk_rows', 'ce_impl', 'attention_impl',
                                'layer_norm_impl', 'ffn_impl', 'search_space'})
# Fields that only say how long to train: a run that differs in them is resumed, not refused.
BUDGET_FIELDS = frozenset({'max_epochs', 'patience'})


class GridMismatchError(ValueError):
  """A workdir of the grid holds a run of another configuration."""


def parse_override(text: str) -> tuple[str, str]:
  """`'field=value'` (dotted fields for nested dicts) to `('field', 'value')`."""
  field, sep, value = text.partition('=')
  if not sep or not field:
    raise ValueError(f'Override {text!r}: expected FIELD=VALUE')
  return field, value


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[tuple[str, str]]) -> None:
  """Sets each `field` to `value` parsed as the field's current type (like `--config.f=v`)."""
  for field, value in overrides:
    *parents, name = field.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    if name not in node:
      raise KeyError(f'Override {field}: no such config field')
    node[name] = _parse_like(node[name], value, field)


def _parse_like(current, value: str, field: str):
  if isinstance(current, bool):
    if value.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'Override {field}={value}: expected true or false')
    return value.lower() in ('true', '1')
  if isinstance(current, (int, float, str)):
    return type(current)(value)
  raise ValueError(f'Override {field}: cannot set a field of type {type(current).__name__}')


def layout_of(config: ml_collections.ConfigDict) -> str | None:
  """The KERNEL_LAYOUTS name of a PKA config's kernel fields (None if it matches none)."""
  values = tuple(config[f] for f in default.KERNEL_FIELDS)
  return next((name for name, layout in default.KERNEL_LAYOUTS.items() if layout == values),
              None)


@dataclasses.dataclass(frozen=True)
class Cell:
  """One row of a table: a model (and PKA kernel layout) on one dataset config."""

  config_path: str
  model: str
  layout: str | None = None

  @property
  def dataset(self) -> str:
    return os.path.splitext(os.path.basename(self.config_path))[0]

  @property
  def name(self) -> str:
    return self.model if self.layout is None else f'{self.model}-{self.layout}'

  @property
  def variant(self) -> str:
    return f'model={self.model}' + ('' if self.layout is None else f',kernel={self.layout}')

  def config(self, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    config = config_files.load_file(self.config_path, self.variant)
    apply_overrides(config, overrides)
    return config


@dataclasses.dataclass(frozen=True)
class Spec:
  """One run: a cell at one seed under a root, with the overrides of the whole grid."""

  cell: Cell
  seed: int
  root: str
  overrides: tuple[tuple[str, str], ...] = ()

  @property
  def workdir(self) -> str:
    return self._workdir(str(self.seed))

  def _workdir(self, seed: str) -> str:
    return os.path.join(self.root, self.cell.dataset, self.cell.name, f'seed{seed}')

  def config(self) -> ml_collections.ConfigDict:
    config = self.cell.config(self.overrides)
    config.seed = self.seed
    return config

  def command(self, seed: str | None = None) -> str:
    """The single-run command that trains exactly this run (with `seed` written in place
    of its seed, e.g. 'K', for a whole cell)."""
    seed = str(self.seed) if seed is None else seed
    flags = [f'--config={self.cell.config_path}:{self.cell.variant}',
             *(f'--config.{field}={value}' for field, value in self.overrides),
             f'--config.seed={seed}', f'--workdir={self._workdir(seed)}']
    return 'python -m pka_jax.main ' + ' '.join(flags)


def cells(config_paths: Iterable[str], models: Iterable[str],
          layouts: Iterable[str] = ()) -> list[Cell]:
  """The grid's cells per dataset: each model, then each PKA layout. A layout equal to the
  config's own PKA kernels is the `pka` cell itself (one run, not two)."""
  result = []
  for path in config_paths:
    pka_layout = layout_of(config_files.load_file(path, 'model=pka'))
    for model in models:
      if model not in default.MODEL_POSITIONS:
        raise ValueError(f'Unknown model {model!r}: expected one of {sorted(DISPLAY)}')
      result.append(Cell(path, model))
    for layout in layouts:
      if layout not in default.KERNEL_LAYOUTS:
        raise ValueError(f'Unknown kernel layout {layout!r}: expected one of '
                         f'{sorted(default.KERNEL_LAYOUTS)}')
      result.append(Cell(path, 'pka', None if layout == pka_layout else layout))
  return list(dict.fromkeys(result))  # first occurrence order, duplicates dropped


def specs(grid_cells: Sequence[Cell], seeds: Iterable[int], root: str,
          overrides: Sequence[tuple[str, str]] = ()) -> list[Spec]:
  """Seed-major order: an interrupted grid has every cell at the first seeds."""
  return [Spec(cell, seed, root, tuple(overrides)) for seed in seeds for cell in grid_cells]


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = '') -> dict[str, object]:
  """`{'synthetic.seed': 0, ...}`: dotted field names to JSON values."""
  tree = json.loads(config.to_json()) if isinstance(config, ml_collections.ConfigDict) else config
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_differences(wanted: ml_collections.ConfigDict, saved: ml_collections.ConfigDict
                       ) -> dict[str, tuple[object, object]]:
  """Fields that change results, `{field: (saved, wanted)}` where they differ. A field on one
  side only (a config field added or removed since the run) is logged, not counted."""
  a, b = flatten(saved), flatten(wanted)
  if one_side := sorted(a.keys() ^ b.keys()):
    logging.warning('Config fields on one side only (code changed since the run?): %s',
                    ', '.join(one_side))
  return {f: (a[f], b[f]) for f in sorted(a.keys() & b.keys())
          if f.split('.')[0] not in BOOKKEEPING_FIELDS and a[f] != b[f]}


def read_metrics(workdir: str) -> list[dict]:
  """Every record of a run's `metrics.jsonl`, in the order written."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def wall_seconds(records: Iterable[dict]) -> float:
  """Train, validation and other time of every epoch run (interrupted epochs excluded)."""
  return sum(r.get(k, 0.0) for r in records for k in ('time/train_s', 'time/valid_s',
                                                       'time/other_s'))


def run_one(spec: Spec, train_fn: Callable = jobs.train) -> tuple[dict, str]:
  """Reads back, resumes or trains one run; returns its row and what was done."""
  workdir, config = spec.workdir, spec.config()
  has_results = os.path.exists(os.path.join(workdir, 'results.json'))
  try:
    saved = checkpoint.restore_config(workdir)
  except FileNotFoundError:  # never trained, or stopped before its first checkpoint
    saved = None
  action = 'trained'
  if saved is not None:
    differences = config_differences(config, saved)
    refused = {f: d for f, d in differences.items() if f not in BUDGET_FIELDS}
    if refused:
      raise GridMismatchError(f'{workdir} holds a run of another configuration ('
                              + '; '.join(f'{f}: {a!r} there, {b!r} here'
                                          for f, (a, b) in refused.items())
                              + '): use another --root')
    action = 'read back' if has_results and not differences else 'resumed'
  if action != 'read back':
    os.makedirs(workdir, exist_ok=True)
    files.write_text(os.path.join(workdir, 'config.json'),
                     config.to_json(indent=2, sort_keys=True))
    train_fn(config, workdir)
  return read_row(spec), action


def read_row(spec: Spec) -> dict:
  """The runs.csv row of a finished run: identity, budget, validation and test metrics."""
  with open(os.path.join(spec.workdir, 'results.json')) as f:
    results = json.load(f)
  row = {'dataset': spec.cell.dataset, 'cell': spec.cell.name, 'model': spec.cell.model,
         'layout': spec.cell.layout or '', 'seed': spec.seed, 'epochs': results['epochs'],
         'best_step': results['best_step'],
         'wall_s': round(wall_seconds(read_metrics(spec.workdir)), 1)}
  for part in ('valid', 'test'):
    for metric in METRICS:
      row[f'{part}/{metric}'] = results[part][metric]
      if f'{metric}_se' in results[part]:
        row[f'{part}/{metric}_se'] = results[part][f'{metric}_se']
  row['test/num_steps'] = results['test'].get('num_steps')
  row['workdir'] = spec.workdir
  return row


def varying_fields(grid_specs: Sequence[Spec]) -> dict[Spec, dict[str, object]]:
  """Per run, the config fields that differ between runs of the grid (seed included)."""
  flat = {s: flatten(s.config()) for s in grid_specs}
  fields = sorted({f for c in flat.values() for f in c})
  varying = [f for f in fields if len({json.dumps(c.get(f)) for c in flat.values()}) > 1]
  return {s: {f: flat[s].get(f) for f in varying} for s in grid_specs}


def runs_csv(rows: Sequence[dict]) -> str:
  columns = list(dict.fromkeys(k for row in rows for k in row))
  out = io.StringIO()
  writer = csv.DictWriter(out, columns, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  return out.getvalue()


def interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
  """Mean and half-width of the Student-t confidence interval of the mean (nan below 2)."""
  values = np.asarray(values, dtype=np.float64)
  mean = float(values.mean())
  if len(values) < 2:
    return mean, math.nan
  from scipy import stats  # pylint: disable=g-import-not-at-top  # 0.6 s; tables only
  t = stats.t.ppf(0.5 + confidence / 2, df=len(values) - 1)
  return mean, float(t * values.std(ddof=1) / math.sqrt(len(values)))


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
  """Two-sided Welch t-test p-value of equal means (nan below two values a side, or with no
  spread at all)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if min(len(a), len(b)) < 2:
    return math.nan
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  if va + vb == 0:
    return math.nan
  t = (a.mean() - b.mean()) / math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  from scipy import stats  # pylint: disable=g-import-not-at-top  # 0.6 s; tables only
  return float(2 * stats.t.sf(abs(t), df))


def _label(cell: Cell, pka_layout: str | None = None) -> str:
  if cell.model == 'pka' and (cell.layout or pka_layout):
    return f'PKA `{cell.layout or pka_layout}`'
  return DISPLAY.get(cell.model, cell.model)


def _metric_table(cells_in_order: Sequence[Cell], values: dict[Cell, dict[str, list[float]]],
                  labels: dict[Cell, str], extra_rows: Sequence[list[str]] = ()) -> list[str]:
  header = ['model', 'seeds', *(f'{m.upper()}' for m in METRICS), 'epochs', 'wall (min)']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  summaries = {c: {m: interval(values[c][m]) for m in METRICS} for c in cells_in_order}
  best = {m: max(summaries[c][m][0] for c in cells_in_order) for m in METRICS}
  for cell in cells_in_order:
    cells_text = []
    for metric in METRICS:
      mean, half = summaries[cell][metric]
      text = f'{mean:.4f}' + ('' if math.isnan(half) else f' ± {half:.4f}')
      cells_text.append(f'**{text}**' if np.isclose(mean, best[metric], rtol=0, atol=5e-5)
                        else text)
    epochs, wall = values[cell]['epochs'], values[cell]['wall_s']
    lines.append('| ' + ' | '.join([
        labels[cell], str(len(values[cell]['ndcg@10'])), *cells_text,
        f'{np.mean(epochs):.0f}', f'{np.mean(wall) / 60:.1f}']) + ' |')
  lines += ['| ' + ' | '.join([*row, *[''] * (len(header) - len(row))]) + ' |'
            for row in extra_rows]
  return lines


def relative_change_row(pka: dict[str, list[float]], baselines: dict[str, dict[str, list[float]]]
                        ) -> list[str]:
  """PKA's mean against the best baseline mean of each metric: `+x.x% vs NAME (p=…)`."""
  row = ['PKA vs best baseline', '']
  for metric in METRICS:
    name, base = max(baselines.items(), key=lambda item: np.mean(item[1][metric]))
    change = np.mean(pka[metric]) / np.mean(base[metric]) - 1.0
    p = welch_p(pka[metric], base[metric])
    row.append(f'{change:+.1%} vs {name}' + ('' if math.isnan(p) else f' (p={p:.2g})'))
  return row


def table_markdown(rows: Sequence[dict], grid_specs: Sequence[Spec], command: str) -> str:
  """Per dataset: the models table, the PKA layouts table (if the grid has layouts), and the
  command and config of every cell."""
  by_cell: dict[Cell, dict[str, list[float]]] = {}
  spec_of_row = {(s.cell.dataset, s.cell.name, s.seed): s for s in grid_specs}
  for row in rows:
    cell = spec_of_row[(row['dataset'], row['cell'], row['seed'])].cell
    values = by_cell.setdefault(cell, {k: [] for k in (*METRICS, 'epochs', 'wall_s')})
    for metric in METRICS:
      values[metric].append(row[f'test/{metric}'])
    values['epochs'].append(row['epochs'])
    values['wall_s'].append(row['wall_s'])
  lines = ['# Test metrics over seeds', '',
           f'Made by `{command}`. Each cell: mean ± half-width of the 95% Student-t interval '
           'over seeds (one run per seed; seeds change parameters, dropout and data order, '
           'never the data). Best mean per column in bold. "PKA vs best baseline": relative '
           'change of the mean against the best other model of that column, with the Welch '
           't-test p-value. Per-run numbers (with each run\'s standard error over evaluation '
           'steps) are in runs.csv.', '']
  dataset_order = list(dict.fromkeys(s.cell.dataset for s in grid_specs))
  for dataset in dataset_order:
    lines += _dataset_section(dataset, [c for c in dict.fromkeys(s.cell for s in grid_specs)
                                        if c.dataset == dataset], by_cell, grid_specs)
  return '\n'.join(lines) + '\n'


def _dataset_section(dataset: str, dataset_cells: list[Cell],
                     by_cell: dict[Cell, dict[str, list[float]]],
                     grid_specs: Sequence[Spec]) -> list[str]:
  done = [c for c in dataset_cells if c in by_cell]
  if not done:
    return [f'## {dataset}', '', 'No finished run yet.', '']
  config_path = done[0].config_path
  pka_layout = layout_of(config_files.load_file(config_path, 'model=pka'))
  lines = [f'## {dataset} (`{config_path}`)', '']
  models = [c for c in done if c.layout is None]
  if models:
    labels = {c: _label(c) for c in models}
    extra = []
    pka = next((c for c in models if c.model == 'pka'), None)
    baselines = {labels[c]: by_cell[c] for c in models if c.model != 'pka'}
    if pka is not None and baselines:
      extra.append(relative_change_row(by_cell[pka], baselines))
    lines += ['Test metrics at 10 by model (PKA in its default layout'
              + (f', `{pka_layout}`' if pka_layout else '') + ').', '']
    lines += _metric_table(models, by_cell, labels, extra) + ['']
  layouts = [c for c in done if c.model == 'pka']
  if any(c.layout is not None for c in layouts):
    labels = {c: _label(c, pka_layout) for c in layouts}
    lines += ['PKA kernel layouts (configs/default.py `KERNEL_LAYOUTS`), test metrics at 10.', '']
    lines += _metric_table(layouts, by_cell, labels) + ['']
  lines += ['Cells: the command of each run (`K` = its seed) and the config fields that '
            f'differ from `{config_path}` (the whole config is `config.json` in each workdir).',
            '']
  base = flatten(config_files.load_file(config_path))
  for cell in dataset_cells:
    seeds = [s.seed for s in grid_specs if s.cell == cell]
    spec = next(s for s in grid_specs if s.cell == cell)
    changed = {f: v for f, v in flatten(spec.config()).items()
               if base.get(f) != v and f != 'seed'}
    diff = ', '.join(f'{f}={v}' for f, v in changed.items()) or 'none'
    lines.append(f'* {cell.name}: `{spec.command("K")}`, K in {seeds}; differs in: {diff}')
  return lines + ['']


def run_grid(grid_specs: Sequence[Spec], root: str, command: str,
             train_fn: Callable = jobs.train) -> list[dict]:
  """Every run of the grid in order; runs.csv and table.md rewritten after each."""
  rows = []
  varying = varying_fields(grid_specs)
  os.makedirs(root, exist_ok=True)
  for index, spec in enumerate(grid_specs, 1):
    start = time.perf_counter()
    row, action = run_one(spec, train_fn)
    row = {**row, **{f'config.{f}': v for f, v in varying[spec].items()}}
    rows.append(row)
    logging.info('[%d/%d] %s/%s seed %d: %s in %.0f s; %d epochs, test NDCG@10 %.4f (%s)',
                 index, len(grid_specs), spec.cell.dataset, spec.cell.name, spec.seed, action,
                 time.perf_counter() - start, row['epochs'], row['test/ndcg@10'], spec.workdir)
    files.write_text(os.path.join(root, 'runs.csv'), runs_csv(rows))
    files.write_text(os.path.join(root, 'table.md'), table_markdown(rows, grid_specs, command))
  return rows
