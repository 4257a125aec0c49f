"""The training loop: epochs of steps, validation after each, checkpoints, early stopping, and
the test of the best checkpoint."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

from absl import logging
import jax
import ml_collections
import tqdm

from pka_jax import config_check
from pka_jax import data
from pka_jax import files
from pka_jax.data.pipeline import TrainInput
from pka_jax.data.sequences import SplitDataset
from pka_jax.evaluation import protocol
from pka_jax.evaluation.evaluator import Evaluator
from pka_jax.training import checkpoint
from pka_jax.training import faults
from pka_jax.training import metric_writer
from pka_jax.training import workdir as workdir_lib
from pka_jax.training.placement import Placement
from pka_jax.training.progress import Progress


class Trainer:
  """One training run in a workdir: its state, input, evaluator, checkpoints and progress,
  on the meshes and programs of `placement`."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, dataset: SplitDataset,
               placement: Placement):
    self.config, self.workdir, self.dataset, self.placement = config, workdir, dataset, placement
    init_rng, self.dropout_rng = jax.random.split(
        jax.random.key(config.seed, impl=config.prng_impl))
    self.state = placement.init_state(init_rng)
    self.inputs = TrainInput(
        dataset.train, maxlen=config.maxlen, batch_size=config.batch_size, seed=config.seed,
        process_index=placement.host_index, process_count=placement.host_count,
        trim=placement.trims_windows, padding_column=placement.padding_column)
    self.evaluator = _evaluator(config, dataset, placement)
    self.checkpoints = checkpoint.manager(
        workdir, interval_s=config.get('checkpoint_interval_s', 0))
    self.progress = Progress()
    self.epoch_seconds: dict[str, float] = {}
    self.watch = faults.PreemptionWatch()  # entered by train_and_test
    if config.trim_windows and not placement.trims_windows:
      _log_full_windows(config, placement)

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, workdir: str, *,
             train_devices: int | None = None, devices=None) -> Trainer:
    """Checks `config` for the machine (filling in what it leaves to the backend) and the
    workdir before any work, then loads the dataset (prepared by process 0 once).
    `devices` (all by default) and `train_devices`: as `Placement`'s."""
    devices = jax.devices() if devices is None else devices
    config_check.settle(config, devices=len(devices), processes=jax.process_count())
    workdir_lib.check_writable(workdir)
    dataset = data.load_dataset_once(config)
    placement = Placement.of(config, dataset.num_items, train_devices=train_devices,
                             devices=devices)
    return cls(config, workdir, dataset, placement)

  # ---- checkpoints ----

  def restore_latest(self) -> bool:
    step = self.checkpoints.latest_step()
    if step is None:
      return False
    workdir_lib.check_same_run(self.config, checkpoint.restore_config(self.workdir),
                               self.workdir)
    self.state, progress = checkpoint.restore(self.checkpoints, step, self.state)
    self.progress = Progress(**progress)
    logging.info('Resumed from step %d (epoch %d done)', step, self.progress.epoch)
    return True

  def restore_best(self) -> None:
    if self.progress.best_step < 0:
      raise FileNotFoundError(f'No validated checkpoint in {self.workdir}')
    self.state, _ = checkpoint.restore(self.checkpoints, self.progress.best_step, self.state)

  def save(self, metrics: dict | None = None) -> None:
    checkpoint.save(
        self.checkpoints, int(self.state.step), state=self.state,
        progress=dataclasses.asdict(self.progress), config=self.config, metrics=metrics)
    faults.die_here('save')

  def stop_for_preemption(self) -> None:
    """Saves the state at this step boundary and raises faults.Preempted."""
    self.save()
    checkpoint.wait(self.checkpoints)
    step = int(self.state.step)
    raise faults.Preempted(
        f'preempted: saved step {step} in {checkpoint.directory(self.workdir)}; run the same '
        'command again to resume')

  # ---- training ----

  def train_on(self, local_batch) -> dict[str, jax.Array]:
    """One train step on this host's rows of a batch; its metrics (dispatched, not awaited)."""
    self.state, metrics = self.placement.train_on(self.state, local_batch, self.dropout_rng,
                                                  float(self.config.learning_rate))
    return metrics

  def train_epoch(self, writer: metric_writer.MetricWriter) -> None:
    """Runs the rest of the current epoch, checkpointing every `checkpoint_every_steps`."""
    config = self.config
    iterator = self.inputs.epoch(self.progress.epoch, self.progress.data_iterator)
    index = (self.progress.data_iterator or {}).get('next_index', 0)  # batches of the epoch
    bar = tqdm.tqdm(total=self.inputs.steps_per_epoch, initial=index,
                    desc=f'epoch {self.progress.epoch + 1}',
                    disable=jax.process_index() != 0 or not logging.level_info(), leave=False)
    log = _TrainLog(writer, bar, config.batch_size)
    step = int(self.state.step)  # counted on the host: reading the state would block
    try:
      for local_batch in iterator:
        metrics = self.train_on(local_batch)
        step, index = step + 1, index + 1
        faults.die_here('step')
        log.add(step, metrics)
        if step % config.log_every_steps == 0:
          log.write(step)
        preempted = self.watch.reached(step)
        # A save due at the epoch's last step waits for its validation (save_due): saved
        # twice, the step's first checkpoint had to be deleted before the second was written,
        # and a kill in between lost both.
        if preempted or (self.save_due(step) and index < self.inputs.steps_per_epoch):
          log.flush()  # no state is saved before its step's loss is known to be finite
          self.progress.data_iterator = iterator.get_state()
          if preempted:
            self.stop_for_preemption()
          self.save()
      log.flush()
    except faults.NonFiniteLoss as error:
      latest = self.checkpoints.latest_step()
      raise faults.NonFiniteLoss(
          f'{error}; its update was not applied and training stopped. Last good checkpoint: '
          + (f'step {latest} in {checkpoint.directory(self.workdir)}' if latest is not None
             else 'none') + ' (a lower learning_rate may help)') from None
    finally:
      bar.close()
    self.progress.epoch += 1
    self.progress.data_iterator = None

  # ---- validation and early stopping ----

  def evaluate(self, part: str) -> dict[str, float]:
    """Metrics of the current parameters on `part`; a preemption signal interrupts it
    between batches (protocol.Interrupted). Each host builds only its rows of a batch."""
    return self.evaluator.evaluate(
        part, self.placement.eval_params(self.state.params),
        interrupt=lambda: self.watch.signalled,
        before_batch=lambda: faults.die_here('eval_batch'))

  def validate_and_checkpoint(self, writer: metric_writer.MetricWriter) -> dict[str, float]:
    start = time.perf_counter()
    try:
      metrics = {f'valid/{k}': v for k, v in self.evaluate('valid').items()}
    except protocol.Interrupted:
      self.stop_for_preemption()  # the epoch's training is saved; validation comes on resume
    self.epoch_seconds['valid'] = time.perf_counter() - start
    step = int(self.state.step)
    improved = self.progress.record_validation(metrics[checkpoint.BEST_METRIC], step)
    self.progress.history.append({'epoch': self.progress.epoch, 'step': step, **metrics})
    writer.write(step, {**metrics, 'epoch': self.progress.epoch})
    # The best and the last checkpoints are needed; any other waits for no earlier save and
    # comes `checkpoint_interval_s` after the last. An epoch can take less than a save (on an
    # H200, ML-1M's 0.2 s against 0.3 s): waiting had the loop stall for half of each epoch,
    # and a save's writing slows the next epoch's steps. A skipped save costs only a resume's
    # redoing the epochs since the latest checkpoint, which gives the same result.
    if improved or self.finished() or self.save_due(step) or self.checkpoints.should_save(step):
      self.save(metrics)
    return metrics

  def save_due(self, step: int) -> bool:
    """Whether `checkpoint_every_steps` asks for a checkpoint of `step`."""
    every = self.config.checkpoint_every_steps
    return bool(every) and step % every == 0

  def run_epoch(self, writer: metric_writer.MetricWriter) -> dict[str, float]:
    """Trains one epoch, validates and checkpoints; writes where its time went
    (`time/train_s`, `time/valid_s` and the rest of the epoch, `time/other_s`)."""
    start = time.perf_counter()
    if not self.progress.validation_pending():
      self.train_epoch(writer)
    self.epoch_seconds['train'] = time.perf_counter() - start
    metrics = self.validate_and_checkpoint(writer)
    total = time.perf_counter() - start
    train_s, valid_s = self.epoch_seconds['train'], self.epoch_seconds['valid']
    writer.write(int(self.state.step), {'time/train_s': train_s, 'time/valid_s': valid_s,
                                        'time/other_s': total - train_s - valid_s})
    return metrics

  def finished(self) -> bool:
    return self.progress.finished(self.config.max_epochs, self.config.patience)

  # ---- the whole run ----

  def test_best(self) -> dict:
    """Validation and test metrics of the best checkpoint, also written to results.json."""
    self.restore_best()
    try:
      test = self.evaluate('test')
    except protocol.Interrupted:
      raise faults.Preempted('preempted while testing the best checkpoint, which is saved: '
                             'run the same command again to finish') from None
    results = {'best_step': self.progress.best_step, 'epochs': self.progress.epoch,
               'valid': self.progress.best_validation(), 'test': test}
    if jax.process_index() == 0:
      files.write_json(os.path.join(self.workdir, 'results.json'), results)
    return results

  def train_and_test(self, on_validation: Callable[[int, dict[str, float]], None] | None = None
                     ) -> dict:
    """Trains until early stopping (resuming from the latest checkpoint), then tests the
    best checkpoint; closes the checkpoints. `on_validation(epoch, metrics)` is called after
    each epoch's validation (and checkpoint); an exception it raises stops the run there."""
    self.restore_latest()
    # Records past the restored step come from work the resumed run does again.
    writer = metric_writer.MetricWriter(self.workdir, after_step=int(self.state.step))
    logging.info('%d training users, %d items, %d steps per epoch', len(self.inputs.users),
                 self.dataset.num_items, self.inputs.steps_per_epoch)
    try:
      with self.watch:
        while not self.finished():
          metrics = self.run_epoch(writer)
          logging.info('epoch %d: valid ndcg@10 %.4f (best %.4f at step %d)',
                       self.progress.epoch, metrics[checkpoint.BEST_METRIC],
                       self.progress.best_ndcg, self.progress.best_step)
          if on_validation is not None:
            on_validation(self.progress.epoch, metrics)
        checkpoint.wait(self.checkpoints)
        results = self.test_best()
      writer.write(self.progress.best_step,
                   {f'test/{k}': v for k, v in results['test'].items()})
    finally:
      writer.close()
      self.checkpoints.close()
    return results

  def test_checkpoint(self) -> dict:
    """Restores the workdir's latest checkpoint and tests its best, without training."""
    try:
      if not self.restore_latest():
        raise FileNotFoundError(f'No checkpoint in {os.path.join(self.workdir, "checkpoints")}')
      return self.test_best()
    finally:
      self.checkpoints.close()


def _evaluator(config: ml_collections.ConfigDict, dataset: SplitDataset,
               placement: Placement) -> Evaluator:
  """The run's evaluator: each host builds its own data shards' rows of every batch."""
  shards = placement.eval_mesh.shape['data']
  per_host = shards // placement.host_count
  first = placement.host_index * per_host
  return Evaluator(dataset, placement.rank, maxlen=config.maxlen,
                   batch_size=config.eval_batch_size, top_k=config.top_k, shards=shards,
                   held=range(first, first + per_host), windows=placement.evaluation_windows)


def _log_full_windows(config: ml_collections.ConfigDict, placement: Placement) -> None:
  reason = ('a query-side kernel' if config.mask_padding_keys
            else 'dropout masks drawn by jax.random' if placement.padding_column
            else 'padding keys visible')
  logging.info('Training windows stay maxlen wide: with %s, leading padding changes the '
               'outputs%s.', reason, ' (evaluation keeps a padding column)'
               if placement.evaluation_windows['trim'] else '')


class _TrainLog:
  """Train loss and throughput, read one step late so that dispatch stays ahead."""

  def __init__(self, writer: metric_writer.MetricWriter, bar: tqdm.tqdm, batch_size: int):
    self.writer, self.bar, self.batch_size = writer, bar, batch_size
    self.pending: tuple[int, dict[str, jax.Array]] | None = None
    self._reset()

  def _reset(self) -> None:
    self.loss_sum, self.loss_count, self.steps, self.start = 0.0, 0.0, 0, time.perf_counter()

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.flush()
    self.pending = step, metrics
    self.bar.update(1)

  def flush(self) -> None:
    """Reads the pending step's metrics; stops the run on a non-finite loss."""
    if self.pending is None:
      return
    step, metrics = self.pending
    self.pending = None
    loss_sum, loss_count, finite = jax.device_get(
        (metrics['loss_sum'], metrics['loss_count'], metrics['finite']))
    loss_sum, loss_count = float(loss_sum), float(loss_count)
    if not finite:
      raise faults.NonFiniteLoss(f'non-finite loss or gradient at step {step} (loss sum '
                                 f'{loss_sum})')
    self.loss_sum, self.loss_count, self.steps = (
        self.loss_sum + loss_sum, self.loss_count + loss_count, self.steps + 1)

  def write(self, step: int) -> None:
    """Writes the mean loss and sequences/s of the steps read since the last write."""
    if not self.loss_count:
      return
    scalars = {'train/loss': self.loss_sum / self.loss_count,
               'train/sequences_per_s':
                   self.steps * self.batch_size / (time.perf_counter() - self.start)}
    self.writer.write(step, scalars)
    self.bar.set_postfix(loss=f'{scalars["train/loss"]:.4f}',
                         seq_per_s=f'{scalars["train/sequences_per_s"]:.0f}')
    self._reset()
