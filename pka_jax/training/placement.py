"""Where a run's arrays live and the programs that run on them.

`Placement` is the one owner of placement: the training and evaluation meshes, the
shardings of the train state, of batches and of the parameters as evaluation reads them,
the training and evaluation models built for those meshes, and the jitted programs (the
train step, its length-sorted microbatch form, the evaluation ranking). Training,
evaluation, the benchmarks and the deviceless compiles (for a GPU or TPU slice this machine
does not have) all go through it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

from absl import logging
from flax.training import train_state
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from pka_jax import sharding
from pka_jax.data.sequences import window_width
from pka_jax.evaluation import ranking
from pka_jax.evaluation.protocol import EvalBatch
from pka_jax.model.encoder import Encoder, ModelConfig
from pka_jax.training import microbatching
from pka_jax.training import optimizer
from pka_jax.training import steps


# Placements kept built (their programs compiled), the most recently used.
BUILT_PLACEMENTS = 8
_BUILT: collections.OrderedDict = collections.OrderedDict()


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
  """What a run's programs depend on, and nothing else: runs whose configs differ only in
  their seed, learning rate (an input of the train step), data, length or bookkeeping have
  one spec, and share one `Placement`."""

  model: ModelConfig  # for training (deterministic False)
  maxlen: int
  batch_size: int
  microbatches: int
  trim_windows: bool
  mesh_model: int
  prng_impl: str
  adam_b1: float
  adam_b2: float
  loss: str
  ce_block_size: int
  ce_chunk_rows: int
  ce_impl: str
  eval_batch_size: int
  top_k: int

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, num_items: int) -> ProgramSpec:
    fields = {f.name for f in dataclasses.fields(cls)} - {'model'}
    return cls(model=ModelConfig.from_config(config, num_items),
               **{name: config[name] for name in fields})


class Placement:
  """A run's meshes, shardings, models and jitted programs, for its `ProgramSpec`.

  Evaluation takes every one of `devices` (all by default); training the first
  `train_devices` of them (on one process; all by default): a CPU split into one device per
  core evaluates faster on all, but trains faster on one (sharding.devices_to_train).
  `Placement.of` builds one from a settled config (config_check.settle), or returns the one
  built already for the same spec and devices: its programs are compiled once a process,
  however many runs (seeds of a grid, trials of a search) use them.
  """

  def __init__(self, spec: ProgramSpec, *, train_devices: int | None = None, devices=None):
    self.spec, self.num_items = spec, spec.model.num_items
    devices = list(jax.devices() if devices is None else devices)
    self.eval_mesh = sharding.make_mesh(spec.mesh_model, devices)
    self.mesh = self.eval_mesh  # training's
    if train_devices is not None and train_devices < len(devices):
      if jax.process_count() > 1:
        raise ValueError('train_devices: training on some devices only needs one process')
      self.mesh = sharding.make_mesh(spec.mesh_model, devices[:train_devices])
      logging.info('Training on %d of the %d devices, evaluating on all.', train_devices,
                   len(devices))
    logging.info('Training mesh: %s.', self.describe())
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(sharding.DATA))
    self.eval_batch_sharding = NamedSharding(self.eval_mesh, P(sharding.DATA))
    self.model = Encoder(dataclasses.replace(spec.model, deterministic=False), mesh=self.mesh)
    self.eval_model = Encoder(dataclasses.replace(spec.model, deterministic=True),
                              mesh=self.eval_mesh)
    self._init = functools.partial(optimizer.create_train_state, self.model, spec)
    abstract = jax.eval_shape(self._init, jax.random.key(0, impl=spec.prng_impl))
    self.state_shardings = sharding.state_shardings(abstract, self.mesh)
    self.eval_param_shardings = sharding.state_shardings(abstract.params, self.eval_mesh)
    # Of a maxlen-wide batch; a trimmed one may be split in fewer (steps.train_step).
    self.train_microbatches = spec.microbatches or microbatching.microbatches_for(
        spec.batch_size // self.data_shards, spec.maxlen)
    # On one host, where windows trim: microbatches of rows of similar length, each cut to
    # its own window (train_on). Several hosts would have to agree on every width.
    self.sorts_microbatches = (self.trims_windows and self.train_microbatches > 1
                               and jax.process_count() == 1)
    self.host_index, self.host_count = sharding.host_slice(self.mesh)
    self._build_programs()

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, num_items: int, *,
         train_devices: int | None = None, devices=None) -> Placement:
    devices = tuple(jax.devices() if devices is None else devices)
    key = (ProgramSpec.of(config, num_items), train_devices, devices)
    if key in _BUILT:
      _BUILT.move_to_end(key)
    else:
      _BUILT[key] = cls(key[0], train_devices=train_devices, devices=devices)
      while len(_BUILT) > BUILT_PLACEMENTS:
        _BUILT.popitem(last=False)
    return _BUILT[key]

  def _build_programs(self) -> None:
    spec, loss = self.spec, steps.loss_options(self.spec, self.num_items)
    self.init_fn = jax.jit(self._init, out_shardings=self.state_shardings)
    self.step_fn = jax.jit(
        functools.partial(steps.train_step, microbatches=spec.microbatches,
                          mesh=self.mesh, **loss),
        in_shardings=(self.state_shardings, self.batch_sharding, self.replicated,
                      self.replicated),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
    self.sorted_step_fn = jax.jit(
        functools.partial(steps.length_sorted_step, mesh=self.mesh, **loss),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
    # Evaluation scores, masks and ranks each device's rows; only the top-k leave it.
    self.rank_fn = jax.jit(
        functools.partial(ranking.rank_on_mesh, config=spec, mesh=self.eval_mesh,
                          model=self.eval_model, num_items=self.num_items),
        in_shardings=(self.eval_param_shardings,) + (self.eval_batch_sharding,) * 4,
        out_shardings=NamedSharding(self.eval_mesh, P()))

  def describe(self) -> str:
    return (f'data {self.mesh.shape[sharding.DATA]} x model {self.mesh.shape[sharding.MODEL]} '
            f'(the item table split over {self.mesh.shape[sharding.MODEL]} devices)')

  @property
  def data_shards(self) -> int:
    return self.mesh.shape[sharding.DATA]

  @property
  def trims_windows(self) -> bool:
    """Whether batches are cut to the columns they need (config.trim_windows, where exact)."""
    return self.spec.trim_windows and self.model.config.trims_in_training

  @property
  def evaluation_windows(self) -> dict[str, bool]:
    """How evaluation cuts its windows (`SuccessiveSteps.batch`'s options): as training does
    or, with visible padding keys that are all alike, keeping a padding column, even where
    training keeps its windows (masks drawn by jax.random); `ModelConfig.evaluation_windows`."""
    return self.eval_model.config.evaluation_windows(self.spec.trim_windows)

  @property
  def padding_column(self) -> bool:
    """Whether cut windows keep a padding column in every row that is not full: its
    padding keys, all alike, stand for the full window's (encoder.Encoder)."""
    return self.evaluation_windows['padding_column']

  # ---- training ----

  def init_state(self, rng: jax.Array) -> train_state.TrainState:
    return self.init_fn(rng)

  def abstract_state(self, rng: jax.Array):
    """The train state's shapes, placed as `init_state` would place them."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        jax.eval_shape(self._init, rng), self.state_shardings)

  def shard_rows(self, local_rows: np.ndarray, rows_sharding: NamedSharding | None = None
                 ) -> jax.Array:
    """An array sharded over 'data' (training's, by default) from this host's rows of it."""
    return jax.make_array_from_process_local_data(rows_sharding or self.batch_sharding,
                                                  local_rows)

  def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: self.shard_rows(v) for k, v in local_batch.items()}

  def train_on(self, state: train_state.TrainState, local_batch: dict[str, np.ndarray],
               rng: jax.Array, learning_rate: float
               ) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
    """One train step at `learning_rate` on this host's rows of a batch: the new state and
    its metrics (dispatched, not awaited).

    The batch runs as one program (`step_fn`) or, where `sorts_microbatches`, as
    microbatches of rows of similar history length, each cut to the window its longest
    history needs (`microbatches.length_sorted_microbatches`): the same gradient, dropout
    masks included, for fewer FLOPs when lengths are spread.
    """
    if not self.sorts_microbatches:
      return self.step_fn(state, self.shard_batch(local_batch), rng, learning_rate)
    return self.sorted_step_fn(state, self.sorted_microbatches(local_batch), rng,
                               learning_rate)

  @property
  def _microbatch_positions(self) -> int:
    """Positions per device of a length-sorted microbatch: those of one of
    `train_microbatches` maxlen-wide microbatches."""
    rows_per_device = self.spec.batch_size // self.data_shards
    return rows_per_device * self.spec.maxlen // self.train_microbatches

  def microbatches_of(self, inputs_BxT: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """`train_on`'s length-sorted microbatches of a batch, as `(rows, width)`."""
    return microbatching.length_sorted_microbatches(
        inputs_BxT, data_shards=self.data_shards, maxlen=self.spec.maxlen,
        positions=self._microbatch_positions, padding_column=self.padding_column)

  @functools.cached_property
  def _stack_layout(self) -> dict[str, dict[int, int]]:
    """`microbatch_stacks`' shapes, the same every step: for each width `window_width` can
    give, the rows of a microbatch and as many slots as a batch could fill."""
    maxlen = self.spec.maxlen
    widths = sorted({window_width(n, maxlen) for n in range(1, maxlen + 1)})
    rows_at = {w: microbatching.microbatch_rows(w, positions=self._microbatch_positions,
                                                data_shards=self.data_shards) for w in widths}
    capacity = {w: -(-self.spec.batch_size // rows) for w, rows in rows_at.items()}
    return {'rows_at': rows_at, 'capacity': capacity}

  def sorted_microbatches(self, local_batch: dict[str, np.ndarray]) -> dict[int, dict]:
    """A batch as `length_sorted_step` takes it, on the devices: a stack per window width."""
    stacks = microbatching.microbatch_stacks(
        local_batch, self.microbatches_of(local_batch['inputs']), **self._stack_layout)
    rows_sharding = NamedSharding(self.mesh, P(None, sharding.DATA))
    return jax.tree.map(
        lambda x: jax.device_put(x, rows_sharding if x.ndim else self.replicated), stacks)

  # ---- evaluation ----

  def eval_params(self, params):
    """`params` laid out for evaluation: a copy where it runs on more devices than training."""
    return jax.device_put(params, self.eval_param_shardings)

  def rank(self, params, batch: EvalBatch) -> tuple[jax.Array, jax.Array]:
    """Top-k lists and target ranks of one evaluation batch (this host's rows), dispatched;
    `params` as `eval_params` lays them out."""
    arrays = (batch.inputs_BxT, batch.seen_rows_P, batch.seen_items_P, batch.targets_B)
    return self.rank_fn(params, *(self.shard_rows(a, self.eval_batch_sharding) for a in arrays))
