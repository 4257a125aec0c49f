"""Plain-text tables of validation and test metrics."""

from __future__ import annotations

COLUMNS = ('hr', 'ndcg', 'mrr', 'cov')


def _cell(metrics: dict[str, float], name: str, k: int) -> str:
  value = metrics[f'{name}@{k}']
  stderr = metrics.get(f'{name}@{k}_se')
  return f'{value:.4f}' + (f' ± {stderr:.4f}' if stderr is not None else '')


def results_table(results_by_model: dict[str, dict], k: int = 10) -> str:
  """One row per (model, split): HR/NDCG/MRR at k with standard errors, and COV."""
  width = max([10, *map(len, results_by_model)])
  header = f'{"model":<{width}} {"split":<6}' + ''.join(
      f'{f"{c.upper()}@{k}":>20}' for c in COLUMNS)
  lines = [header, '-' * len(header)]
  for model, results in results_by_model.items():
    for split in ('valid', 'test'):
      cells = ''.join(f'{_cell(results[split], c, k):>20}' for c in COLUMNS)
      lines.append(f'{model:<{width}} {split:<6}{cells}')
  return '\n'.join(lines)
