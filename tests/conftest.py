"""Test-wide settings: eight CPU devices, strict rank promotion, and one XLA compile cache for
the whole test run, shared by every pytest-xdist worker and every subprocess a test starts."""

import os
import shutil
import tempfile

import jax

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')

_CACHE_VARIABLE = 'JAX_COMPILATION_CACHE_DIR'
# Programs that compile faster than this are not worth a file.
_MIN_COMPILE_SECONDS = '0.2'


def pytest_configure(config):
  """The run's first process (the xdist controller, or the only one) makes the cache and
  names it in the environment, which workers and subprocesses inherit. A fresh cache per run
  keeps a run's time honest: CI starts with none."""
  if not hasattr(config, 'workerinput') and _CACHE_VARIABLE not in os.environ:
    config.pka_jax_cache = tempfile.mkdtemp(prefix='pka_jax_tests_xla_cache_')
    os.environ[_CACHE_VARIABLE] = config.pka_jax_cache
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = _MIN_COMPILE_SECONDS
  if _CACHE_VARIABLE in os.environ:
    jax.config.update('jax_compilation_cache_dir', os.environ[_CACHE_VARIABLE])
    jax.config.update('jax_persistent_cache_min_compile_time_secs',
                      float(_MIN_COMPILE_SECONDS))


def pytest_unconfigure(config):
  cache = getattr(config, 'pka_jax_cache', None)
  if cache is not None:
    shutil.rmtree(cache, ignore_errors=True)
    os.environ.pop(_CACHE_VARIABLE, None)
