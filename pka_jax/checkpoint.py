"""Orbax checkpoints of a run: the latest step and the best step by validation NDCG@10.

Each step holds the train state, the run's progress (epoch, early-stopping record, the data
iterator state) and the config as JSON, so a checkpoint alone can rebuild the model.
"""

from __future__ import annotations

import os

import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = 'valid/ndcg@10'
ITEMS = ('state', 'progress', 'config')


def manager(workdir: str, *, read_only: bool = False) -> ocp.CheckpointManager:
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(1),
      # Ties go to the earlier step, as in the run's own record of its best (Progress).
      checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: (metrics[BEST_METRIC], -metrics['step']), n=1,
          keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, read_only=read_only)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options, item_names=ITEMS)


def save(mngr: ocp.CheckpointManager, step: int, *, state, progress: dict,
         config: ml_collections.ConfigDict, metrics: dict | None = None) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      progress=ocp.args.JsonSave(progress),
      config=ocp.args.JsonSave(config.to_dict())),
      metrics=None if metrics is None else {**metrics, 'step': step})


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
    raise FileNotFoundError(f'No checkpoint in {os.path.join(workdir, "checkpoints")}')
  restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(restored.config)
