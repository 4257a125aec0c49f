"""What the kernel benchmarks share: timing a jitted function, comparing a Pallas kernel with
its XLA path, writing figures."""

import dataclasses
import json
import os
import statistics
import time

from absl import flags
import jax


@dataclasses.dataclass(frozen=True)
class KernelFlags:
  dtype: flags.FlagHolder
  steps: flags.FlagHolder
  interpret: flags.FlagHolder
  json: flags.FlagHolder


def define_flags(dtype_help: str = 'Activations.', timed: str = 'implementation'
                 ) -> KernelFlags:
  """The flags every kernel benchmark takes: `--dtype`, `--steps`, `--interpret`, `--json`.
  A function, not flags defined on import: gpu_kernels.py imports this module and has its
  own `--json`."""
  return KernelFlags(
      dtype=flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16'], dtype_help),
      steps=flags.DEFINE_integer('steps', 20, f'Timed calls of each {timed}.'),
      interpret=flags.DEFINE_bool('interpret', False, "Off a GPU, run the Pallas kernels in "
                                  "Pallas's interpreter (slow: small shapes only)."),
      json=flags.DEFINE_string('json', None, 'Also write the figures to this JSON file.'))


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


def against_pallas(baseline: str, shape: dict, build, differences, kernel_flags: KernelFlags
                   ) -> dict:
  """A Pallas kernel's benchmark against its XLA path on the default device: `build(impl)`
  gives the jitted function of `baseline` or 'pallas' and its arguments; each is timed, and
  its output compared with the baseline's (`differences(out, reference)`, a dict of
  relative differences), `--steps` times over. Off a GPU the kernel runs only with
  `--interpret`. Prints a line each, writes the report to `--json` if given, and returns
  it."""
  steps, json_path = kernel_flags.steps.value, kernel_flags.json.value
  device = jax.devices()[0]
  report = {'device': f'{device.platform} {device.device_kind}', 'jax': jax.__version__,
            'shape': shape, 'implementations': {}}
  print(f"device  {report['device']} (jax {jax.__version__}); {shape}")
  impls = [baseline] + (['pallas'] if jax.default_backend() == 'gpu'
                        or kernel_flags.interpret.value else [])
  if 'pallas' not in impls:
    print('pallas  skipped: Triton kernels need a GPU (--interpret runs them interpreted)')
  reference = None
  for impl in impls:
    figures, out = timed(*build(impl), steps)
    reference = reference or out
    figures['difference'] = differences(out, reference)
    report['implementations'][impl] = figures
    compared = ', '.join(f'{name} {value:.1e}' for name, value in figures['difference'].items())
    print(f"{impl:8s} {figures['seconds'] * 1e3:9.3f} ms alone, "
          f"{figures['back_to_back_seconds'] * 1e3:9.3f} ms back to back; compile "
          f"{figures['compile_seconds']:5.1f} s; vs {baseline}: {compared}")
  if json_path:
    write_json(report, json_path)
  return report
