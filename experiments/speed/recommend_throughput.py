"""Recommendations per second from a trained workdir, at a few batch sizes.

  python -m experiments.speed.recommend_throughput --workdir=runs/synthetic --batch_sizes=1,512

Times three paths on users' real histories (cycled), after one untimed call per shape:
`Recommender.recommend` (raw ids in and out, the Python API), `recommend_dense` (dense ids,
the scoring alone plus the host's batching) and the jax.export scorer's `call` (dense,
left-padded B×T input, as a serving process would run it). Prints the device and the load
average before and after, since other processes sharing the CPU slow every figure.
"""

import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

from pka_jax.serving import export
from pka_jax.serving import recommender as recommender_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir.', required=True)
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '512'], 'Histories per call.')
_K = flags.DEFINE_integer('k', 10, 'Items per list.')
_SECONDS = flags.DEFINE_float('seconds', 5.0, 'Timed seconds per path and batch size (at least).')


def per_second(call, rows: int) -> tuple[float, float]:
  """`(recommendations/s, median ms per call)` of `call()`, which returns a result for `rows`."""
  jax.block_until_ready(call())  # compiles this shape
  times = []
  start = time.perf_counter()
  while time.perf_counter() - start < _SECONDS.value:
    tick = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - tick)
  return rows * len(times) / sum(times), 1e3 * float(np.median(times))


def paths(recommender: recommender_lib.Recommender, scorer, batch: int) -> dict:
  """The timed calls for `batch` users' histories (cycled)."""
  histories = recommender.served.histories
  dense = [np.asarray(histories[u % len(histories)]) for u in range(batch)]
  raw = [recommender.item_ids[h - 1].tolist() for h in dense]
  inputs_BxT = recommender_lib.left_padded(dense, batch, recommender.maxlen)
  return {
      'recommend (raw ids)': lambda: recommender.recommend(raw, k=_K.value).scores,
      'recommend_dense': lambda: recommender.recommend_dense(dense, _K.value).scores,
      'exported scorer.call': lambda: scorer.call(inputs_BxT),
  }


def main(argv):
  del argv
  load_before = os.getloadavg()
  recommender = recommender_lib.Recommender.from_workdir(_WORKDIR.value)
  scorer = export.export_scorer(recommender, _K.value)
  print(f'device: {jax.devices()[0].device_kind} ({jax.device_count()} devices, '
        f'{os.cpu_count()} cores); k={_K.value}, maxlen={recommender.maxlen}, '
        f'{recommender.served.num_items} items; load average before {load_before[0]:.2f}')
  print(f'{"batch":>6}  {"path":<22} {"recs/s":>10} {"ms/call":>9}')
  for batch in map(int, _BATCH_SIZES.value):
    for name, call in paths(recommender, scorer, batch).items():
      rate, ms = per_second(call, batch)
      print(f'{batch:>6}  {name:<22} {rate:>10,.0f} {ms:>9.2f}')
  print(f'load average after {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  app.run(main)
