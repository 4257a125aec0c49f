"""Test-wide settings: eight CPU devices, strict rank promotion, XLA flags that compile fast,
one XLA compile cache for the whole test run (shared by every pytest-xdist worker and every
subprocess a test starts), and what is expensive to make and only read by tests, made once
per run."""

from collections.abc import Iterator
import contextlib
import fcntl
import functools
import gc
import os
import pathlib
import shutil
import tempfile
import types

# The suite's time is mostly XLA compiling small programs, and these flags make it compile about
# twice as fast on a CPU: no LLVM optimisation passes, XLA's older elemental emitters instead of
# its MLIR fusion emitters (which build an MLIR context per fusion), and each program's machine
# code made in one piece. They compute the same values to rounding (six train steps of
# configs/test.py: the same metrics, parameters within a few ulps): what the tests check is this
# project's code, not XLA's. Set before JAX's backend starts, so that it and every subprocess
# (which inherits the environment) use them.
_XLA_TEST_FLAGS = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false',
                   '--xla_cpu_parallel_codegen_split_count=1')
for _flag in _XLA_TEST_FLAGS:
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')

_CACHE_VARIABLE = 'JAX_COMPILATION_CACHE_DIR'
# Every program is kept, single operations included: with the flags above a cache hit is cheaper
# than compiling even the smallest (a pka_jax.main subprocess compiles ~0.5 s less).
_MIN_COMPILE_SECONDS = '0'


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


def pytest_collection_finish(session):
  """What collecting imported (JAX, flax, orbax and the tests: long-lived objects) is frozen
  out of the garbage collector's passes, as the commands do (cli.importing)."""
  del session
  gc.freeze()
  # Tracing and compiling thousands of programs makes bursts of short-lived objects: a pass
  # every 700 allocations (the default) took 2.5% of models_test's and attention_test's time,
  # one every 10,000 takes 0.6%.
  gc.set_threshold(10_000)


# pytest-xdist hands a whole module to whichever worker asks next, so the module a worker
# starts last decides when the run ends. The modules that take longest (measured: 155 s of
# worker time for train_test down to 13 s) start first, the short ones fill in after them
# and the two workers end within seconds of each other; the rest keep their file order.
# `--no-loadscope-reorder` (pyproject.toml) keeps xdist from ordering modules by their
# count of tests instead.
LONGEST_FIRST = ('train_test', 'models_test', 'multihost_test', 'tune_test', 'benchmark_test',
                 'recommend_test', 'faults_test', 'model_parallel_test', 'main_test',
                 'disk_full_test', 'plan_test', 'dropout_test', 'pallas_ffn_test',
                 'preemption_test', 'losses_test', 'attention_test')


_missing = [name for name in LONGEST_FIRST
            if not (pathlib.Path(__file__).parent / f'{name}.py').exists()]
if _missing:  # a renamed module would silently lose its place
  raise pytest.UsageError(f'tests/conftest.py: LONGEST_FIRST names no test module {_missing}')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: within a module too


def pytest_unconfigure(config):
  cache = getattr(config, 'pka_jax_cache', None)
  if cache is not None:
    shutil.rmtree(cache, ignore_errors=True)
    os.environ.pop(_CACHE_VARIABLE, None)


@pytest.fixture(scope='session')
def shared_dir(tmp_path_factory, worker_id) -> pathlib.Path:
  """A directory every xdist worker of this test run sees (this run's own, never an earlier
  run's)."""
  base = tmp_path_factory.getbasetemp()
  return base if worker_id == 'master' else base.parent


@contextlib.contextmanager
def _once_per_run(shared_dir: pathlib.Path, name: str) -> Iterator[tuple[pathlib.Path, bool]]:
  directory = shared_dir / name
  with open(shared_dir / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = directory / '.built'
    yield directory, not done.exists()
    done.touch()


@pytest.fixture(scope='session')
def once_per_run(shared_dir):
  """`with once_per_run(name) as (directory, build):` the first worker of the run to come
  builds `directory` in the block (`build` True) while the others wait on a lock; later
  comers find it built. For what tests only read."""
  return functools.partial(_once_per_run, shared_dir)


@pytest.fixture(scope='session')
def trained_test_run(once_per_run):
  """configs/test.py trained for two epochs, once per test run for every test that only reads
  a trained workdir. Trained with a relative data_dir, as the README's commands do, then
  moved away from the directory it was trained in: whoever reads it has no dataset beside
  it. Never write into it (copy it first)."""
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from pka_jax import data, jobs  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.max_epochs = 2
  config.data_dir = 'data'  # relative: only valid in the training directory
  with once_per_run('trained_test_run') as (root, build):
    train_cwd, workdir = root / 'train_cwd', root / 'moved' / 'run'
    if build:
      train_cwd.mkdir(parents=True, exist_ok=True)
      with pytest.MonkeyPatch.context() as patch:
        patch.chdir(train_cwd)
        jobs.train(config, 'run')
      shutil.copytree(train_cwd / 'run', workdir)
      shutil.rmtree(train_cwd / 'run')
  config.data_dir = str(train_cwd / 'data')
  return types.SimpleNamespace(workdir=str(workdir), config=config, root=root,
                               train_cwd=train_cwd, dataset=data.load_dataset(config))
