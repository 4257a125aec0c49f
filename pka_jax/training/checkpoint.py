"""Orbax checkpoints of a run: the latest step and the best step by validation NDCG@10.

Each step holds the train state, the run's progress (epoch, early-stopping record, the data
iterator state) and the config as JSON, so a checkpoint alone can rebuild the model. Orbax
writes a step under a temporary name and renames it when complete: a process killed while
saving leaves only that temporary directory, which the next run discards with a warning and
resumes from the previous complete step.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import functools
import glob
import logging as std_logging
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from pka_jax import sharding
from pka_jax.model.encoder import create_model

BEST_METRIC = 'valid/ndcg@10'
ITEMS = ('state', 'progress', 'config')
_UNFINISHED = '*.orbax-checkpoint-tmp*'


def _orbax_warnings_only(record: std_logging.LogRecord) -> bool:
  return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def _orbax_errors_only(record: std_logging.LogRecord) -> bool:
  return record.levelno >= std_logging.ERROR or '/orbax/' not in record.pathname


def _orbax_without_tracebacks(record: std_logging.LogRecord) -> bool:
  return record.exc_info is None or '/orbax/' not in record.pathname


def quiet_orbax_logging(tracebacks: bool = False) -> None:
  """Orbax logs every checkpoint step at INFO: keep its warnings only. A save failing in its
  background thread is logged with a traceback there and raised again where the run waits
  for its saves, which reports it: drop the log unless `tracebacks`."""
  handler = logging.get_absl_handler()
  handler.addFilter(_orbax_warnings_only)
  if not tracebacks:
    handler.addFilter(_orbax_without_tracebacks)


@contextlib.contextmanager
def orbax_errors_only() -> Iterator[None]:
  """Orbax warns at every read-only restore: keep its errors only, for the block."""
  logger = std_logging.getLogger('absl')
  logger.addFilter(_orbax_errors_only)
  try:
    yield
  finally:
    logger.removeFilter(_orbax_errors_only)


class CheckpointError(OSError):
  """A checkpoint could not be written; the earlier ones are intact."""


def directory(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, 'checkpoints'))


@functools.cache
def save_replicas_whole_in_one_process() -> None:
  """In a one-process run, orbax writes each replicated array whole, from one device.

  Orbax's default for CPUs and TPUs cuts a replicated array into one slice per replica, so
  that many hosts share its writing. In one process every replica is on the same host, and
  the slices are only more, smaller writes: on 8 CPU devices a save of the test model's
  state took 2.2-2.5x less time whole, an ML-1M-sized one 2x less
  (experiments/speed/checkpoint_benchmark.py).
  The files are orbax's usual ones either way (it already writes whole arrays on GPUs), and
  restore reads both. Runs of several processes keep orbax's default."""
  if jax.process_count() == 1:
    use_array_handler(replica_parallel=False)


def use_array_handler(replica_parallel: bool) -> None:
  """Registers, for the whole process, orbax's own default jax.Array handler (as its
  type_handler_registry makes it), with replica-parallel writing on or off."""
  from orbax.checkpoint._src.metadata import array_metadata_store  # pylint: disable=g-import-not-at-top
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          array_metadata_store=array_metadata_store.Store(),
          use_replica_parallel=replica_parallel),
      override=True)


def manager(workdir: str, *, read_only: bool = False, interval_s: float = 0
            ) -> ocp.CheckpointManager:
  """The run's checkpoints; `should_save` says no while a save is being written or within
  `interval_s` seconds of the last one."""
  save_replicas_whole_in_one_process()
  path = directory(workdir)
  unfinished = sorted(glob.glob(os.path.join(path, _UNFINISHED)))
  if unfinished and not read_only:
    logging.warning('Discarding %d unfinished checkpoint(s) of an interrupted save (%s); the '
                    'run goes on from the last complete step.', len(unfinished),
                    ', '.join(os.path.basename(p) for p in unfinished))
  # Ties go to the earlier step, as in the run's own record of its best (Progress).
  rank = lambda metrics: (metrics[BEST_METRIC], -metrics['step'])
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(1),
      checkpoint_managers.BestN(get_metric_fn=rank, n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, read_only=read_only, cleanup_tmp_directories=not read_only,
      # Orbax writes a step's metrics to disk only when `best_fn` is set. Without them a
      # resumed run knew no metrics of the steps saved before it, and its first save deleted
      # an earlier best checkpoint.
      best_fn=rank,
      # Every save here is forced; this policy only answers `should_save`, which the run asks
      # before a save it may skip (decided on the primary host and shared, so every host
      # skips the same saves).
      save_decision_policy=checkpoint_managers.ContinuousCheckpointingPolicy(
          minimum_interval_secs=interval_s or None))
  return ocp.CheckpointManager(path, options=options, item_names=ITEMS)


def save(mngr: ocp.CheckpointManager, step: int, *, state, progress: dict,
         config: ml_collections.ConfigDict, metrics: dict | None = None) -> bool:
  """Saves `step` (asynchronously); returns whether anything was written.

  A step saved already is kept unless this save brings validation metrics (the state is the
  same; the progress then records the validation): a mid-epoch or preemption save at the
  last step of an epoch must not stop the validated checkpoint of that step from being kept.
  """
  wait(mngr)  # orbax would wait for the save in flight anyway; then all_steps is complete
  if step in mngr.all_steps():
    if metrics is None:
      return False
    mngr.delete(step)
  try:
    mngr.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        progress=ocp.args.JsonSave(progress),
        config=ocp.args.JsonSave(config.to_dict())),
        metrics=None if metrics is None else {**metrics, 'step': step})
  except OSError as error:
    raise CheckpointError(f'could not save the checkpoint of step {step} in '
                          f'{mngr.directory}: {error}') from error
  return True


def wait(mngr: ocp.CheckpointManager) -> None:
  """Waits for the save in flight; a failure in the background becomes a CheckpointError."""
  try:
    mngr.wait_until_finished()
  except OSError as error:
    _let_the_failed_save_end(mngr)
    raise CheckpointError(f'could not finish saving a checkpoint in {mngr.directory}: '
                          f'{error}') from error


def _let_the_failed_save_end(mngr: ocp.CheckpointManager) -> None:
  """Waits for the other writes of a save that failed in the background: orbax stops waiting
  at the first failure, and a write still in flight when the run exits prints tracebacks from
  its closed event loop. Reaches into orbax's async manager; without it, does nothing."""
  async_manager = getattr(getattr(mngr, '_checkpointer', None), '_async_manager', None)
  for commit in getattr(async_manager, '_commit_futures', None) or ():
    try:
      commit.result()
    except BaseException:  # pylint: disable=broad-except  # the first failure is reported
      pass


def restore(mngr: ocp.CheckpointManager, step: int, state_target) -> tuple[object, dict]:
  """The train state (shaped and sharded like `state_target`) and the progress at `step`."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(state_target),
      progress=ocp.args.JsonRestore()))
  return restored.state, restored.progress


def restore_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved with the latest checkpoint of `workdir`."""
  mngr = manager(workdir, read_only=True)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {directory(workdir)}')
  restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(restored.config)


def resolve_step(mngr: ocp.CheckpointManager, workdir: str, step: int | str) -> int:
  """The step number `step` names: 'latest', 'best' (the run's recorded best validation, the
  step its test metrics come from) or a saved step."""
  latest = mngr.latest_step()
  if latest is None:
    raise FileNotFoundError(f'No checkpoint in {directory(workdir)}')
  if step == 'latest':
    return latest
  if step == 'best':
    progress = mngr.restore(latest, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
    best = progress.progress['best_step']
    if best < 0:
      raise FileNotFoundError(f'No validated checkpoint in {workdir}')
    return best
  number = int(step)
  if number not in mngr.all_steps():
    raise FileNotFoundError(f'No checkpoint of step {number} in {workdir}: it holds steps '
                            f'{sorted(mngr.all_steps())}')
  return number


def restore_params(workdir: str, params_target, step: int | str = 'best') -> tuple[int, dict]:
  """`(step number, parameters)` of a checkpoint, placed like `params_target` (abstract
  arrays with shardings). The optimiser state is not read: it may have another structure
  (another optimiser, or a checkpoint of an earlier version)."""
  target = {'params': params_target}
  mngr = manager(workdir, read_only=True)
  try:
    number = resolve_step(mngr, workdir, step)
    restored = mngr.restore(number, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  finally:
    mngr.close()
  return number, restored.state['params']


def params_target(config: ml_collections.ConfigDict, num_items: int,
                  mesh: jax.sharding.Mesh | None = None):
  """The parameters' shapes as a checkpoint restores them: on one device, or with the item
  table's rows split over `mesh`'s 'model' axis."""
  model = create_model(config, num_items, deterministic=True)
  inputs_1xT = jnp.zeros((1, config.maxlen), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs_1xT)['params'])
  placements = (jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
                             shapes) if mesh is None else sharding.state_shardings(shapes, mesh))
  return jax.tree.map(lambda a, placement: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                sharding=placement),
                      shapes, placements)
