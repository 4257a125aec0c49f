"""Times `python -m pka_jax.data` on generated raw files shaped like the real ones.

  python -m experiments.speed.prepare_benchmark                 # 1M-row ML-1M, 20M-row Yambda
  python -m experiments.speed.prepare_benchmark --parquet_rows=46_000_000

Writes an ML-1M-shaped `ml-1m.zip` (`UserID::MovieID::Rating::Timestamp`, 6,040 users, 3,706
movies) and a Yambda-listens-shaped parquet (`uid, timestamp, item_id, is_organic,
played_ratio_pct, track_length_seconds`, 10,000 users), then runs the prepare command on each
as a child process, twice: the first run builds the store, the second reuses it. Reports wall
time (including interpreter start-up) and the command's peak resident memory
(`getrusage(RUSAGE_CHILDREN)` in a small launcher process).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

from absl import app
from absl import flags
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_WORK_DIR = flags.DEFINE_string('work_dir', None, 'Where to write the files (default: a temp '
                                'directory, removed afterwards).')
_ML1M_ROWS = flags.DEFINE_integer('ml1m_rows', 1_000_209, 'Ratings in the ML-1M-shaped file.')
_PARQUET_ROWS = flags.DEFINE_integer('parquet_rows', 20_000_000, 'Rows in the Yambda parquet.')

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_ML1M_START, _ML1M_END = 956_703_932, 1_046_454_590  # first and last ML-1M timestamps


def _counts(rng: np.random.Generator, total: int, groups: int, minimum: int) -> np.ndarray:
  """Heavy-tailed per-group counts, each at least `minimum` (if possible), summing to `total`."""
  minimum = min(minimum, total // groups)
  weights = rng.lognormal(0.0, 1.0, groups)
  counts = minimum + np.floor(weights / weights.sum() * (total - minimum * groups)).astype(int)
  counts[: total - counts.sum()] += 1
  return counts


def _popular(rng: np.random.Generator, num_items: int, size: int) -> np.ndarray:
  """Item ids drawn with a Zipf-like popularity."""
  p = 1.0 / (np.arange(num_items) + 10.0) ** 0.9
  return rng.choice(num_items, size=size, p=p / p.sum()) + 1


def write_ml1m(directory: str, rows: int, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  users = np.repeat(np.arange(1, 6041), _counts(rng, rows, 6040, 20))
  items = _popular(rng, 3706, rows)
  ratings = rng.integers(1, 6, rows)
  times = (_ML1M_START + rng.beta(0.4, 3.0, rows) * (_ML1M_END - _ML1M_START)).astype(np.int64)
  text = '\n'.join(
      f'{u}::{i}::{r}::{t}' for u, i, r, t in zip(users.tolist(), items.tolist(), ratings.tolist(),
                                                  times.tolist(), strict=True)) + '\n'
  path = os.path.join(directory, 'ml1m', 'ml-1m.zip')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as archive:
    archive.writestr('ml-1m/ratings.dat', text)
  return path


def write_yambda(directory: str, rows: int, seed: int = 0, chunk: int = 2_000_000) -> str:
  rng = np.random.default_rng(seed)
  counts = _counts(rng, rows, 10_000, 5)
  users = np.repeat(np.arange(10_000, dtype=np.uint32) * 10 + 10, counts)
  path = os.path.join(directory, 'yambda_listens', 'listens.parquet')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  schema = pa.schema([('uid', pa.uint32()), ('timestamp', pa.uint32()),
                      ('item_id', pa.uint32()), ('is_organic', pa.uint8()),
                      ('played_ratio_pct', pa.uint16()), ('track_length_seconds', pa.uint32())])
  with pq.ParquetWriter(path, schema) as writer:
    for start in range(0, rows, chunk):
      n = min(chunk, rows - start)
      writer.write_table(pa.table({
          'uid': users[start:start + n],
          'timestamp': (np.sort(rng.integers(0, 5_200_000, n)) * 5).astype(np.uint32),
          'item_id': _popular(rng, 900_000, n).astype(np.uint32),
          'is_organic': rng.integers(0, 2, n).astype(np.uint8),
          'played_ratio_pct': rng.integers(0, 120, n).astype(np.uint16),
          'track_length_seconds': rng.integers(60, 400, n).astype(np.uint32),
      }, schema=schema))
  return path


# A fresh, small interpreter starts the command, so that the peak it reports is the command's
# own: a child forked from this process would count this process's memory as well.
_LAUNCHER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def run_prepare(dataset: str, data_dir: str) -> tuple[float, float, str]:
  """Runs the command; returns wall seconds, its peak RSS in MiB and its output."""
  command = [sys.executable, '-m', 'pka_jax.data', f'--dataset={dataset}',
             f'--data_dir={data_dir}', '--nodownload']
  start = time.perf_counter()
  result = subprocess.run([sys.executable, '-c', _LAUNCHER, *command], cwd=REPO,
                          capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  if result.returncode:
    raise RuntimeError(f'prepare {dataset} failed:\n{result.stderr}')
  peak_kib = int(result.stderr.strip().splitlines()[-1])  # ru_maxrss is in KiB on Linux
  return seconds, peak_kib / 1024, result.stdout


def main(argv: list[str]) -> None:
  del argv
  work_dir = _WORK_DIR.value or tempfile.mkdtemp(prefix='prepare_benchmark-')
  print(f'CPUs available: {len(os.sched_getaffinity(0))}; files in {work_dir}')
  try:
    jobs = [('ml1m', write_ml1m, _ML1M_ROWS.value),
            ('yambda_listens', write_yambda, _PARQUET_ROWS.value)]
    for dataset, write, rows in jobs:
      start = time.perf_counter()
      path = write(work_dir, rows)
      print(f'\n{dataset}: wrote {rows:,} rows to {path} '
            f'({os.path.getsize(path) / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s')
      for attempt in ('build', 'reuse'):
        seconds, peak_mib, output = run_prepare(dataset, work_dir)
        print(f'{dataset} {attempt}: wall {seconds:.1f} s, peak RSS {peak_mib:,.0f} MiB')
      print(output)
  finally:
    if not _WORK_DIR.value:
      shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
