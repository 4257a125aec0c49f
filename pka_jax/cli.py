"""How the commands fail: a user's mistake is one line on stderr and a non-zero exit, never a
traceback (unless `--verbosity=1` or more asks for it).

This module imports no JAX, so that a command whose own imports wait for its flags (as
`pka_jax.main` does) reports a mistake in them at once, not after two seconds of loading."""

from __future__ import annotations

import contextlib
import difflib
import gc
import re
import sys
from collections.abc import Callable, Iterator, Sequence

from absl import app
from absl import flags
import ml_collections

from pka_jax import config_files

USER_ERROR_STATUS = 1


def fail(message: str, status: int = USER_ERROR_STATUS) -> None:
  """Prints `error: message` (its first line) on stderr and exits with `status`."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


@contextlib.contextmanager
def reported_failures(user_errors: tuple[type[Exception], ...]) -> Iterator[None]:
  """How a command ends on a failure it expects: a preemption prints its message and exits
  with the restart status; one of `user_errors` is one line and status 1. `--verbosity=1`
  or more shows the traceback instead."""
  from pka_jax.training import faults  # pylint: disable=g-import-not-at-top  # imports JAX
  try:
    yield
  except faults.Preempted as preempted:
    if flags.FLAGS.verbosity >= 1:
      raise
    print(preempted, file=sys.stderr)
    sys.exit(faults.PREEMPTED_EXIT_STATUS)
  except user_errors as error:
    if flags.FLAGS.verbosity >= 1:
      raise
    fail(str(error))


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)`, with a mistake in the flags (a misspelt config field, a value of the
  wrong type, a missing config file) reported in one line instead of absl's traceback. What
  the command has imported so far is frozen out of the garbage collector's passes, as
  `importing` does."""
  gc.freeze()
  app.run(main, flags_parser=parse_flags)


@contextlib.contextmanager
def importing() -> Iterator[None]:
  """A command's heavy imports (JAX, flax, orbax: some 160,000 objects that live as long as
  the process), with the garbage collector paused while they load, then frozen out of its
  later passes (gc.freeze). In two epochs of configs/test.py the collector took 0.40-0.44 s
  of ~5 s of CPU without this, 0.07-0.09 s with it."""
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    gc.freeze()
    if enabled:
      gc.enable()


def parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    argv = flags.FLAGS(argv)
    if 'config' in flags.FLAGS:
      flags.FLAGS.config.keys()  # a config file that failed to load raises only when read
    return argv
  except Exception as error:  # pylint: disable=broad-except
    if _verbose(argv):
      raise
    fail(describe_flag_error(error, argv))


def _verbose(argv: Sequence[str]) -> bool:
  for arg in argv:
    match = re.fullmatch(r'--verbosity=(-?\d+)|-v=?(-?\d+)', arg)
    if match and int(match.group(1) or match.group(2)) >= 1:
      return True
  return False


def describe_flag_error(error: Exception, argv: Sequence[str]) -> str:
  """One line for a flag that could not be parsed."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return f'{type(error).__name__} while parsing the flags'
  if 'Failed loading config file' in str(error):  # what went wrong is the last line
    return f'--config: {lines[-1]}'
  unknown = _unknown_config_field(argv)
  if unknown:
    return unknown
  if len(lines) > 1:  # a header, then the details: what went wrong is the last line
    return f'{lines[0].rstrip(":")}: {lines[-1]}'
  line = lines[0]
  return line[1:-1] if len(line) > 1 and line[0] == line[-1] and line[0] in '"\'' else line


def _unknown_config_field(argv: Sequence[str]) -> str | None:
  """`--config.NAME=...` naming no field of the config file, with the nearest real ones."""
  spec = next((arg.split('=', 1)[1] for arg in argv if arg.startswith('--config=')), None)
  if spec is None:
    return None
  path, _, variant = spec.partition(':')
  try:
    fields = config_fields(config_files.load_file(path, variant or None))
  except Exception:  # pylint: disable=broad-except
    return None  # the flags' own message says what is wrong with the file
  for arg in argv:
    match = re.match(r'--config\.([\w.]+)', arg)
    if match and match.group(1) not in fields:
      name = match.group(1)
      near = nearest(name, fields)
      hint = f'; did you mean {" or ".join(near)}?' if near else ''
      return f'--config.{name}: the config has no field {name!r}{hint}'
  return None


def config_fields(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every field of `config`, nested ones dotted (`synthetic.num_items`)."""
  names = []
  for key, value in config.items():
    names.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      names += config_fields(value, f'{prefix}{key}.')
  return names


def nearest(name: str, fields: Sequence[str], count: int = 3) -> list[str]:
  """The fields `name` most likely means: those it abbreviates (`lr`: `learning_rate`), then
  the closest spellings."""
  initials = [f for f in fields
              if ''.join(word[0] for word in re.split(r'[_.]', f) if word) == name]
  close = difflib.get_close_matches(name, fields, n=count, cutoff=0.6)
  return list(dict.fromkeys(initials + close))[:count]


def split_cpu(asked: int | None, configs: Sequence[ml_collections.ConfigDict], *,
              distributed: bool = False) -> int | None:
  """Splits a CPU into XLA devices as the commands do, before any device is used; returns
  the split asked for (None: the default one), for `sharding.devices_to_train` once the
  devices are up. `asked` is `--cpu_devices` (0: one per core). Without it, a split that the
  environment makes (XLA_FLAGS, JAX_NUM_CPU_DEVICES) stays, and is trained on whole; else
  one device per core (the most that divide every config's batch sizes), evaluating on all
  and training on one, which is faster. No effect on accelerators."""
  # pylint: disable=g-import-not-at-top  # they import JAX
  from pka_jax import config_check
  from pka_jax import sharding
  cpu_devices = asked if asked is not None else sharding.cpu_devices_requested()
  if asked is not None or (cpu_devices is None and not distributed):
    sharding.split_cpu(asked or config_check.cpu_devices_for(configs))
  return cpu_devices
