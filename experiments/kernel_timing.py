"""What the loss and attention benchmarks share: timing a jitted function, writing figures."""

import json
import os
import statistics
import time

import jax


def timed(fn, args, steps: int) -> tuple[dict, object]:
  """Seconds of `fn(*args)`: the first call (compile), the median of `steps` single calls, and
  `steps` calls back to back; and the first call's output."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  compile_seconds = time.perf_counter() - start
  single = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    single.append(time.perf_counter() - start)
  start = time.perf_counter()
  for _ in range(steps):
    result = fn(*args)
  jax.block_until_ready(result)
  return {'compile_seconds': compile_seconds, 'seconds': statistics.median(single),
          'back_to_back_seconds': (time.perf_counter() - start) / steps}, out


def write_json(report: dict, path: str) -> None:
  """`report` as JSON at `path`, atomically (a temporary file, then a rename)."""
  temporary = f'{path}.tmp{os.getpid()}'
  with open(temporary, 'w') as f:
    json.dump(report, f, indent=2)
  os.replace(temporary, path)
