"""The train and evaluation steps compiled from shapes alone, for devices this machine may
not have: a GPU (jax's CUDA plugin), a Cloud TPU slice (libtpu's topologies) or simulated
CPU devices. The program is the one XLA would run there, built by the run's own `Placement`;
experiments/kernels/gpu_kernels.py counts a GPU's kernels, experiments/scale/plan.py sizes a
mesh's memory."""

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
from unittest import mock

import jax
import jax.numpy as jnp

from pka_jax import config_check
from pka_jax import sharding
from pka_jax.data.sequences import power_of_two_at_least
from pka_jax.training.placement import Placement, ProgramSpec

# What jax.jit lowers for, by the name `jax.default_backend()` would give there.
LOWERING_PLATFORMS = {'cpu': 'cpu', 'gpu': 'cuda', 'tpu': 'tpu'}


@contextlib.contextmanager
def backend_answers(backend: str):
  """Every `jax.default_backend()` the program asks while tracing answers `backend`: the
  config's backend-dependent choices (microbatches, loss chunks, attention kernels, the
  config check) are made for it."""
  with mock.patch.object(jax, 'default_backend', return_value=backend):
    yield


def tpu_devices(topology: str) -> list:
  """The chips of a Cloud TPU slice (`v5e:2x2`, `v5p:2x2x2`: libtpu's names), for compiling
  only; libtpu must be installed, a TPU need not be."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('libtpu') is None:
    raise SystemExit(f"compiling for a TPU needs libtpu: pip install '{libtpu_requirement()}'")
  try:
    return list(topologies.get_topology_desc(topology, 'tpu').devices)
  except (NotImplementedError, RuntimeError, ValueError) as error:
    raise SystemExit(f'topology {topology!r}: {str(error).splitlines()[0]}') from None


def libtpu_requirement() -> str:
  """The libtpu version jax[tpu] asks for, as a pip requirement."""
  for requirement in importlib.metadata.requires('jax') or []:
    if requirement.startswith('libtpu'):
      return requirement.split(';')[0].strip()
  return 'libtpu'


@dataclasses.dataclass(frozen=True)
class AbstractStep:
  """A config's train step on the devices of `placement`, every input a shape: the state
  and batch as `jax.ShapeDtypeStruct`s placed as training places them."""
  backend: str
  placement: Placement
  state: object
  args: tuple

  def compile(self):
    with backend_answers(self.backend):
      lowered = self.placement.step_fn.trace(*self.args).lower(
          lowering_platforms=(LOWERING_PLATFORMS[self.backend],))
      return lowered.compile()


def checked(config, devices: list, backend: str):
  """A copy of `config` with the backend's evaluation batch where it leaves it (0), checked
  for `devices`: a problem ends the program in one line, as a user's mistake does."""
  config = config.copy_and_resolve_references()
  processes = len({device.process_index for device in devices})
  with backend_answers(backend):
    try:
      config_check.settle(config, devices=len(devices), processes=processes)
    except config_check.ConfigError as error:
      raise SystemExit(str(error)) from None
  return config


def placement_for(config, num_items: int, devices: list, backend: str):
  """`(config, placement)`: the config checked for `devices` of `backend`, and the run's
  `Placement` there, its backend-dependent choices made for that backend (built anew: it is
  not this process's backend, so it is not one `Placement.of` keeps)."""
  config = checked(config, devices, backend)
  with backend_answers(backend):
    return config, Placement(ProgramSpec.of(config, num_items), devices=devices)


def abstract_train_step(config, num_items: int, devices: list, backend: str) -> AbstractStep:
  config, placement = placement_for(config, num_items, devices, backend)
  key = jax.random.key(config.seed, impl=config.prng_impl)
  state = placement.abstract_state(key)
  batch = {name: jax.ShapeDtypeStruct((config.batch_size, config.maxlen), jnp.int32,
                                      sharding=placement.batch_sharding)
           for name in ('inputs', 'targets')}
  rng = jax.ShapeDtypeStruct((), key.dtype, sharding=placement.replicated)
  return AbstractStep(backend, placement, state, (state, batch, rng, config.learning_rate))


def compile_train_step(config, num_items: int, devices: list, backend: str):
  """The config's train step for `devices` (of `backend`), compiled from shapes alone."""
  return abstract_train_step(config, num_items, devices, backend).compile()


def compile_eval_step(config, num_items: int, devices: list, backend: str):
  """The config's evaluation step (`ranking.rank_on_mesh`: the newest position's hidden
  state, then each 'model' shard's top-k) for `devices`, compiled from shapes alone, on a
  batch of full windows; and the batch's size."""
  config, placement = placement_for(config, num_items, devices, backend)
  key = jax.random.key(config.seed, impl=config.prng_impl)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        placement.abstract_state(key).params, placement.eval_param_shardings)
  rows, shards = placement.eval_batch_sharding, placement.eval_mesh.shape[sharding.DATA]
  batch = config.eval_batch_size
  # Each data shard's seen (row, item) pairs, as many as full windows hold (EvalBatch).
  pairs = shards * power_of_two_at_least(batch // shards * config.maxlen)
  shapes = [(batch, config.maxlen), (pairs,), (pairs,), (batch,)]
  args = [jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows) for shape in shapes]
  with backend_answers(backend):
    lowered = placement.rank_fn.trace(params, *args).lower(
        lowering_platforms=(LOWERING_PLATFORMS[backend],))
    return lowered.compile(), batch
