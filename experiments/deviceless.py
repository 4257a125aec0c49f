"""The train and evaluation steps compiled from shapes alone, for devices this machine may
not have: a GPU (jax's CUDA plugin), a Cloud TPU slice (libtpu's topologies) or simulated
CPU devices. The program is the one XLA would run there, laid out as `train.Run` lays it
out; gpu_kernels.py counts a GPU's kernels, plan.py sizes a mesh's memory."""

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
from unittest import mock

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pka_jax import config_check
from pka_jax import sharding
from pka_jax import train
from pka_jax.data.sequences import power_of_two_at_least
from pka_jax.models import Encoder, create_model

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
  """A config's train step on `devices` of `backend`, every input a shape: the mesh, the
  model, the state and batch as `jax.ShapeDtypeStruct`s placed on the mesh."""
  backend: str
  mesh: jax.sharding.Mesh
  model: Encoder
  state: object
  state_shardings: object
  microbatches: int
  step: functools.partial
  args: tuple

  def compile(self):
    with backend_answers(self.backend):
      step = jax.jit(self.step, out_shardings=(self.state_shardings,
                                               NamedSharding(self.mesh, P())),
                     donate_argnums=0)
      lowered = step.trace(*self.args).lower(
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


def abstract_train_step(config, num_items: int, devices: list, backend: str) -> AbstractStep:
  config = checked(config, devices, backend)
  with backend_answers(backend):
    mesh = sharding.make_mesh(config.mesh_model, devices)
    model = create_model(config, num_items, deterministic=False, mesh=mesh)
    state, state_shardings, key = _abstract_state(config, model, mesh)
    microbatches = config.microbatches or train.microbatches_for(
        config.batch_size // mesh.shape[sharding.DATA], config.maxlen)
  rows = NamedSharding(mesh, P(sharding.DATA))
  batch = {name: jax.ShapeDtypeStruct((config.batch_size, config.maxlen), jnp.int32,
                                      sharding=rows) for name in ('inputs', 'targets')}
  rng = jax.ShapeDtypeStruct((), key.dtype, sharding=NamedSharding(mesh, P()))
  step = functools.partial(train.train_step, microbatches=microbatches, mesh=mesh,
                           **train.loss_options(config, num_items))
  return AbstractStep(backend, mesh, model, state, state_shardings, microbatches, step,
                      (state, batch, rng))


def _abstract_state(config, model: Encoder, mesh: jax.sharding.Mesh):
  """The train state's shapes placed on `mesh` as training places them, their shardings,
  and the initialising key."""
  key = jax.random.key(config.seed, impl=config.prng_impl)
  state = jax.eval_shape(functools.partial(train.create_train_state, model, config), key)
  state_shardings = sharding.state_shardings(state, mesh)
  placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, state_shardings)
  return placed, state_shardings, key


def compile_train_step(config, num_items: int, devices: list, backend: str):
  """The config's train step for `devices` (of `backend`), compiled from shapes alone."""
  return abstract_train_step(config, num_items, devices, backend).compile()


def compile_eval_step(config, num_items: int, devices: list, backend: str):
  """The config's evaluation step (`train.rank_on_mesh`: the newest position's hidden state,
  then each 'model' shard's top-k) for `devices`, compiled from shapes alone, on a batch of
  full windows; and the batch's size."""
  config = checked(config, devices, backend)
  with backend_answers(backend):
    mesh = sharding.make_mesh(config.mesh_model, devices)
    model = create_model(config, num_items, deterministic=True, mesh=mesh)
    params = _abstract_state(config, model, mesh)[0].params
    rows = NamedSharding(mesh, P(sharding.DATA))
    batch, shards = config.eval_batch_size, mesh.shape[sharding.DATA]
    # Each data shard's seen (row, item) pairs, as many as full windows hold (EvalBatch).
    pairs = shards * power_of_two_at_least(batch // shards * config.maxlen)
    arrays = [((batch, config.maxlen), rows), ((pairs,), rows), ((pairs,), rows),
              ((batch,), rows)]
    args = [jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s) for shape, s in arrays]
    rank = functools.partial(train.rank_on_mesh, config=config, mesh=mesh, model=model,
                             num_items=num_items)
    lowered = jax.jit(rank, out_shardings=NamedSharding(mesh, P())).trace(
        params, *args).lower(lowering_platforms=(LOWERING_PLATFORMS[backend],))
    return lowered.compile(), batch
