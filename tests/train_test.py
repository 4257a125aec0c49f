"""Training: the loss falls, the golden first loss, checkpoints, resumption and end to end."""

import functools
import json
import os
import re
import shutil

import chex
from flax.training import train_state
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
import jaxprs
from pka_jax import jobs
from pka_jax.evaluation import evaluator
from pka_jax.evaluation import protocol
from pka_jax.model import encoder
from pka_jax.training import faults
from pka_jax.training import microbatching
from pka_jax.training import optimizer
from pka_jax.training import steps
from pka_jax.training import workdir as workdir_lib
from pka_jax.training.loop import Trainer


@pytest.fixture(autouse=True)
def _data_in_tmp(tmp_path, monkeypatch):
  monkeypatch.setenv('PKA_JAX_TEST_DATA_DIR', str(tmp_path / 'data'))


def config(**overrides):
  cfg = test_config.get_config()
  cfg.data_dir = os.environ['PKA_JAX_TEST_DATA_DIR']
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def first_batch(run: Trainer):
  return run.placement.shard_batch(next(iter(run.inputs.epoch(0))))


def step_on(run: Trainer, batch) -> dict:
  """One whole-batch train step of `run` on `batch`, already on its devices; its metrics."""
  run.state, metrics = run.placement.step_fn(run.state, batch, run.dropout_rng,
                                             run.config.learning_rate)
  return metrics


def batch_loss(run: Trainer, batch) -> float:
  total, count = steps.loss_sums(run.state.params, run.state.apply_fn, batch,
                                 run.dropout_rng, 'ce')
  return float(total / count)


def test_golden_first_loss(tmp_path):
  # Regression guard for the model, its initialisation, the data order and the loss. When a
  # deliberate change moves it, run this test and copy the "Obtained" value it reports.
  run = Trainer.create(config(dropout=0.0), str(tmp_path))
  assert batch_loss(run, first_batch(run)) == pytest.approx(GOLDEN_FIRST_LOSS, rel=1e-4)


GOLDEN_FIRST_LOSS = 4.4290566


def test_loss_falls_over_a_few_steps(tmp_path):
  run = Trainer.create(config(learning_rate=1e-2, dropout=0.0), str(tmp_path))
  batch = first_batch(run)
  before = batch_loss(run, batch)
  for _ in range(15):
    metrics = step_on(run, batch)
  assert np.isfinite(float(metrics['loss_sum']))
  assert batch_loss(run, batch) < 0.8 * before


def params_of(run: Trainer):
  return jax.tree.map(np.asarray, run.state.params)


def test_resume_gives_the_uninterrupted_run(tmp_path):
  uninterrupted = str(tmp_path / 'once')
  interrupted = str(tmp_path / 'twice')
  jobs.train(config(max_epochs=3, patience=100), uninterrupted)
  jobs.train(config(max_epochs=1, patience=100), interrupted)
  resumed = jobs.train(config(max_epochs=3, patience=100), interrupted)
  assert resumed['epochs'] == 3

  runs = [Trainer.create(config(max_epochs=3), d) for d in (uninterrupted, interrupted)]
  for run in runs:
    assert run.restore_latest()
  assert [r.progress.epoch for r in runs] == [3, 3]
  assert int(runs[0].state.step) == int(runs[1].state.step) == 3 * runs[0].inputs.steps_per_epoch
  jax.tree.map(np.testing.assert_array_equal, params_of(runs[0]), params_of(runs[1]))
  assert runs[0].progress.history == runs[1].progress.history


def test_a_run_stopped_mid_epoch_resumes_through_the_loop_to_the_same_parameters(
    tmp_path, monkeypatch):
  uninterrupted, interrupted = str(tmp_path / 'once'), str(tmp_path / 'twice')
  once = jobs.train(config(max_epochs=2), uninterrupted)
  # A preemption noticed after the third step of the first epoch.
  with monkeypatch.context() as patch:
    patch.setattr(faults.PreemptionWatch, 'reached', lambda self, step: step == 3)
    with pytest.raises(faults.Preempted, match='saved step 3'):
      jobs.train(config(max_epochs=2), interrupted)
  stopped = Trainer.create(config(), interrupted)
  assert stopped.restore_latest() and int(stopped.state.step) == 3
  assert stopped.progress.epoch == 0 and stopped.progress.data_iterator is not None
  twice = jobs.train(config(max_epochs=2), interrupted)
  assert twice == once
  runs = [Trainer.create(config(), d) for d in (uninterrupted, interrupted)]
  for run in runs:
    assert run.restore_latest()
  for (path, a), (_, b) in zip(*(jax.tree_util.tree_flatten_with_path(params_of(r))[0]
                                 for r in runs)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_a_checkpoint_every_epoch_end_step_keeps_the_best(tmp_path):
  # Regression: the mid-epoch save took the epoch's last step first, orbax skipped the
  # validated save of that step, and the earlier best checkpoint was deleted.
  probe = Trainer.create(config(), str(tmp_path / 'probe'))
  steps_per_epoch = probe.inputs.steps_per_epoch
  workdir = str(tmp_path / 'run')
  results = jobs.train(
      config(max_epochs=3, patience=100, checkpoint_every_steps=steps_per_epoch), workdir)
  run = Trainer.create(config(), workdir)
  assert run.restore_latest()
  assert [r['step'] for r in run.progress.history] == [steps_per_epoch * e for e in (1, 2, 3)]
  assert results['best_step'] == run.progress.best_step
  assert run.progress.best_step in run.checkpoints.all_steps()
  assert jobs.evaluate(config(), workdir)['test'] == results['test']


def test_an_epoch_end_step_due_a_checkpoint_is_saved_once_with_its_validation(
    tmp_path, monkeypatch):
  # Saved before its validation too, the step's first checkpoint had to be deleted for the
  # validated one, and a kill between the two left neither (nor the one before, which the
  # first had replaced as the latest).
  real_save, saves = Trainer.save, []

  def recording_save(self, metrics=None):
    saves.append((int(self.state.step), metrics is not None))
    return real_save(self, metrics)

  monkeypatch.setattr(Trainer, 'save', recording_save)
  # 6 steps an epoch, a checkpoint due every 4: steps 4 and 8 inside epochs, 12 at the end.
  jobs.train(config(max_epochs=2, patience=100, checkpoint_every_steps=4), str(tmp_path))
  assert saves == [(4, False), (6, True), (8, False), (12, True)]


# Validation NDCG@10 by epoch: bests at 1 and 3, then two epochs without one.
SCRIPTED_NDCG = {1: 0.30, 2: 0.20, 3: 0.40, 4: 0.35, 5: 0.10}


def script_validation(monkeypatch, saving_in_progress: bool) -> list[int]:
  """Scripted validation NDCG@10, orbax answering that a save is (or is not) still being
  written; returns the epochs whose end saved a checkpoint, filled as the run goes."""
  real_evaluate, real_save, saved_epochs = Trainer.evaluate, Trainer.save, []

  def evaluate_scripted(self, part):
    metrics = real_evaluate(self, part)
    if part == 'valid':
      metrics['ndcg@10'] = SCRIPTED_NDCG[self.progress.epoch]
    return metrics

  def save_recorded(self, metrics=None):
    if metrics is not None:
      saved_epochs.append(self.progress.epoch)
    real_save(self, metrics)

  monkeypatch.setattr(Trainer, 'evaluate', evaluate_scripted)
  monkeypatch.setattr(Trainer, 'save', save_recorded)
  monkeypatch.setattr(ocp.CheckpointManager, 'is_saving_in_progress',
                      lambda self: saving_in_progress)
  return saved_epochs


def test_epoch_end_saves_skip_only_what_is_neither_best_nor_last(tmp_path, monkeypatch):
  cfg = config(max_epochs=5, patience=100, checkpoint_interval_s=0)
  saved_epochs = script_validation(monkeypatch, saving_in_progress=False)
  jobs.train(cfg, str(tmp_path / 'idle'))
  assert saved_epochs == [1, 2, 3, 4, 5]
  saved_epochs = script_validation(monkeypatch, saving_in_progress=False)
  jobs.train(config(max_epochs=5, patience=100, checkpoint_interval_s=3600),
                           str(tmp_path / 'hourly'))
  assert saved_epochs == [1, 3, 5]  # the bests and the last: no other within the hour
  saved_epochs = script_validation(monkeypatch, saving_in_progress=True)
  results = jobs.train(cfg, str(tmp_path / 'busy'))
  assert saved_epochs == [1, 3, 5]  # the bests and the last: no wait for any other
  run = Trainer.create(cfg, str(tmp_path / 'busy'))
  assert run.restore_latest() and run.progress.epoch == 5
  assert results['best_step'] == 3 * run.inputs.steps_per_epoch
  assert run.progress.best_step in run.checkpoints.all_steps()


def test_a_run_killed_after_a_skipped_save_resumes_to_the_same_end(tmp_path, monkeypatch):
  cfg = config(max_epochs=5, patience=100)
  script_validation(monkeypatch, saving_in_progress=True)
  once = jobs.train(cfg, str(tmp_path / 'once'))
  # Killed after epoch 4's validation, whose save was skipped: epoch 3's checkpoint is the
  # latest, and the rerun trains and validates epoch 4 again.
  real_train_epoch = Trainer.train_epoch

  def killed_in_epoch_5(self, writer):
    if self.progress.epoch == 4:
      raise KeyboardInterrupt
    real_train_epoch(self, writer)

  with monkeypatch.context() as patch:
    patch.setattr(Trainer, 'train_epoch', killed_in_epoch_5)
    with pytest.raises(KeyboardInterrupt):
      jobs.train(cfg, str(tmp_path / 'twice'))
  stopped = Trainer.create(cfg, str(tmp_path / 'twice'))
  assert stopped.restore_latest() and stopped.progress.epoch == 3
  assert jobs.train(cfg, str(tmp_path / 'twice')) == once
  runs = [Trainer.create(cfg, str(tmp_path / name)) for name in ('once', 'twice')]
  for run in runs:
    assert run.restore_latest()
  assert runs[0].progress.history == runs[1].progress.history
  for (path, a), (_, b) in zip(*(jax.tree_util.tree_flatten_with_path(params_of(r))[0]
                                 for r in runs)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def popularity_results(run: Trainer, part: str) -> dict[str, float]:
  """The successive protocol with every item scored by its count in the training data."""
  counts_V = np.bincount(np.asarray(run.dataset.train.items),
                         minlength=run.dataset.num_items + 1).astype(np.float32)
  return protocol.evaluate(
      lambda inputs_BxT: np.broadcast_to(counts_V, (len(inputs_BxT), len(counts_V))),
      run.dataset, part, maxlen=run.config.maxlen, batch_size=run.config.eval_batch_size)


def test_end_to_end_train_checkpoint_restore_evaluate(tmp_path):
  workdir = str(tmp_path)
  # 600 users and 20 epochs at a high rate: enough for the tiny model to learn the rule.
  cfg = config(max_epochs=20, patience=100, learning_rate=1e-2)
  cfg.synthetic.num_users = 600
  results = jobs.train(cfg, workdir)
  for split in ('valid', 'test'):
    for name in ('hr@10', 'ndcg@10', 'mrr@10', 'cov@10'):
      assert 0.0 <= results[split][name] <= 1.0
    assert results[split]['num_steps'] > 0
  # The model learned more than which items are popular.
  popular = popularity_results(Trainer.create(cfg, str(tmp_path / 'popularity')), 'test')
  assert results['test']['num_steps'] == popular['num_steps']
  assert results['test']['ndcg@10'] > popular['ndcg@10'] + 3 * results['test']['ndcg@10_se']
  assert results['test']['ndcg@10'] > 1.5 * popular['ndcg@10']

  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['test'] == pytest.approx(results['test'])
  lines = open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()
  assert any('train/loss' in json.loads(line) for line in lines)
  assert any('valid/ndcg@10' in json.loads(line) for line in lines)
  assert os.listdir(os.path.join(workdir, 'tensorboard'))

  again = jobs.evaluate(cfg, workdir)
  assert again['test'] == pytest.approx(results['test'])
  assert again['best_step'] == results['best_step']


def counting_built_batches(monkeypatch) -> list[int]:
  """Counts the evaluation batches built from now on (one entry per batch)."""
  built, real_batch = [], protocol.SuccessiveSteps.batch

  def batch(self, *args, **kwargs):
    built.append(1)
    return real_batch(self, *args, **kwargs)

  monkeypatch.setattr(protocol.SuccessiveSteps, 'batch', batch)
  return built


def test_validation_batches_are_built_once_per_run(tmp_path, monkeypatch):
  run = Trainer.create(config(), str(tmp_path / 'run'))
  built = counting_built_batches(monkeypatch)
  batches_a_pass = run.evaluator.steps('valid').num_batches(run.config.eval_batch_size)
  run.evaluate('valid')
  assert len(built) == batches_a_pass > 1
  for _ in range(2):  # new parameters, the kept batches
    step_on(run, first_batch(run))
  kept = run.evaluate('valid')
  assert len(built) == batches_a_pass
  fresh = Trainer.create(config(), str(tmp_path / 'fresh'))
  fresh.state = run.state
  assert fresh.evaluate('valid') == kept  # the same metrics from batches built anew
  run.evaluate('test')
  run.evaluate('test')  # evaluated once a run: not kept
  assert len(built) == 2 * batches_a_pass + 2 * run.evaluator.steps('test').num_batches(
      run.config.eval_batch_size)


def test_validation_batches_too_large_or_interrupted_are_not_kept(tmp_path, monkeypatch):
  run = Trainer.create(config(), str(tmp_path))
  built = counting_built_batches(monkeypatch)
  batches_a_pass = run.evaluator.steps('valid').num_batches(run.config.eval_batch_size)
  run.watch.signalled = True  # a preemption notice: the pass stops after its first batch
  with pytest.raises(protocol.Interrupted):
    run.evaluate('valid')
  run.watch.signalled = False
  monkeypatch.setattr(evaluator, 'VALIDATION_BATCH_BYTES', 1)
  first = run.evaluate('valid')
  assert run.evaluate('valid') == first
  assert len(built) == 1 + 2 * batches_a_pass


def test_trimmed_evaluation_windows_rank_as_the_full_ones(tmp_path):
  cfg = config(eval_batch_size=16)
  cfg.synthetic.min_length = 2  # short contexts: some batches fit 8 columns
  run = Trainer.create(cfg, str(tmp_path))
  for batch in run.inputs.epoch(0):  # trained a little: no parameter at its initial value
    step_on(run, run.placement.shard_batch(batch))
  steps = run.evaluator.steps('valid').by_context_length()
  widths = {steps.batch(start, 16, trim=True).inputs_BxT.shape[1]
            for start in range(0, len(steps), 16)}
  assert widths == {8, 16}
  assert run.placement.trims_windows
  trimmed = run.evaluate('valid')
  assert untrimmed_evaluation(run, tmp_path) == pytest.approx(trimmed, rel=1e-6)


def untrimmed_evaluation(run: Trainer, tmp_path) -> dict[str, float]:
  """Validation metrics of `run`'s parameters by a run that keeps every window maxlen wide."""
  cfg = run.config.copy_and_resolve_references()
  cfg.trim_windows = False
  full = Trainer.create(cfg, str(tmp_path / 'untrimmed'))
  assert full.placement.evaluation_windows == {'trim': False, 'padding_column': False}
  full.state = full.state.replace(params=run.state.params)
  return full.evaluate('valid')


def test_visible_alike_padding_keys_evaluate_trimmed_as_in_full_windows(tmp_path):
  # SASRec with the authors' masking: evaluation trims windows but keeps a padding column in
  # every row that is not full.
  cfg = config(eval_batch_size=16, model='sasrec', position_mode='absolute',
               mask_padding_keys=False)
  cfg.synthetic.min_length = 2
  run = Trainer.create(cfg, str(tmp_path))
  assert run.placement.trims_windows and run.placement.padding_column
  assert run.placement.evaluation_windows == {'trim': True, 'padding_column': True}
  for batch in run.inputs.epoch(0):
    step_on(run, run.placement.shard_batch(batch))
  steps = run.evaluator.steps('valid').by_context_length()
  batches = [steps.batch(start, 16, **run.placement.evaluation_windows)
             for start in range(0, len(steps), 16)]
  assert {b.inputs_BxT.shape[1] for b in batches} == {8, 16}
  for b in batches:  # a padding column in every row that is not full
    real = np.count_nonzero(b.inputs_BxT, axis=1)
    assert np.all((real < b.inputs_BxT.shape[1]) | (real == cfg.maxlen))
  trimmed = run.evaluate('valid')
  assert untrimmed_evaluation(run, tmp_path) == pytest.approx(trimmed, rel=1e-6)


# The authors' masking: SASRec's padding keys visible and all alike.
AUTHORS_PADDING = {'model': 'sasrec', 'position_mode': 'absolute', 'mask_padding_keys': False}


@pytest.mark.parametrize('padding', ['masked', 'visible'])
def test_trimmed_training_batches_give_the_full_windows_loss_and_gradients(tmp_path, padding):
  # Dropout on: a trimmed window draws the masks of the full window's right end. Visible
  # padding keys, all alike, weigh in the full window's through a padding column per row.
  runs = {}
  # Masked: histories of at most 11 inputs need 8 or 16 of 32 columns. Visible: the longest
  # histories, of 16 inputs, need 32 of 64 to keep a padding column.
  overrides, maxlen, longest = (AUTHORS_PADDING, 64, 17) if padding == 'visible' else ({}, 32, 12)
  for trim in (True, False):
    cfg = config(dropout=0.3, maxlen=maxlen, trim_windows=trim, **overrides)
    cfg.synthetic.min_length, cfg.synthetic.max_length = 2, longest
    runs[trim] = Trainer.create(cfg, str(tmp_path / str(trim)))
  assert runs[True].placement.trims_windows
  assert runs[True].placement.padding_column == (padding == 'visible')
  pairs = list(zip(runs[True].inputs.epoch(0), runs[False].inputs.epoch(0)))
  widths = {cut['inputs'].shape[1] for cut, _ in pairs}
  assert widths <= ({8, 16, 32} if padding == 'visible' else {8, 16}) and 16 in widths
  for cut, _ in pairs:  # with visible padding, a padding column in every row
    real = np.count_nonzero(cut['inputs'], axis=1)
    assert np.all(real < cut['inputs'].shape[1]) or padding == 'masked'
  state = runs[False].state

  @jax.jit
  def loss_and_grads(batch):
    def loss(params):
      total, count = steps.loss_sums(params, state.apply_fn, batch, runs[False].dropout_rng,
                                     'ce')
      return total / count
    return jax.value_and_grad(loss)(state.params)

  for cut, whole in pairs:
    (cut_loss, cut_grads), (loss, grads) = loss_and_grads(cut), loss_and_grads(whole)
    assert float(cut_loss) == pytest.approx(float(loss), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 cut_grads, grads)
  # The jitted step takes every width (microbatches picked per shape).
  run = runs[True]
  for cut, _ in pairs:
    metrics = step_on(run, run.placement.shard_batch(cut))
    assert bool(metrics['finite'])


def test_evaluating_an_empty_workdir_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    jobs.evaluate(config(), str(tmp_path))


def test_blockwise_loss_trains_like_the_full_one(tmp_path):
  runs = [Trainer.create(config(dropout=0.0, ce_block_size=size), str(tmp_path / str(size)))
          for size in (0, 16)]
  batch = first_batch(runs[0])
  for run in runs:
    for _ in range(3):
      step_on(run, batch)
  assert_same_params(params_of(runs[1]), params_of(runs[0]))


def test_pallas_loss_trains_like_the_xla_one(tmp_path):
  # In Pallas's interpreter, on one device: the interpreter cannot run inside shard_map
  # (jax 0.10 loses the refs' varying axes), so the data-parallel step is only lowered.
  run = Trainer.create(config(dropout=0.0), str(tmp_path))
  batch = first_batch(run)
  xla, pallas = (params_after_three_steps(jax.jit(pallas_step(run, impl, mesh=None)),
                                          run.state, batch, run.dropout_rng)
                 for impl in ('xla', 'pallas'))
  assert_same_params(pallas, xla)


def test_the_data_parallel_pallas_step_lowers_to_its_kernels_for_a_gpu(tmp_path):
  run = Trainer.create(config(dropout=0.0), str(tmp_path))
  step = jax.jit(pallas_step(run, 'pallas', mesh=run.placement.mesh))
  text = step.trace(run.state, first_batch(run), run.dropout_rng).lower(
      lowering_platforms=('cuda',)).as_text()
  assert text.count('custom_call @__gpu$xla.gpu.triton') == 3


# The tests' eight devices as data 2 x model 4, the item table split, where each of the
# eight still encodes its own rows (sharding.row_axes): each device's kernels run on its share
# of the batch, the one-device case of every kernel (tests/pallas_*_test.py) on a mesh.
MESHES = [pytest.param(4, id='data_2_model_4')]


def run_on(tmp_path, mesh_model: int | None, **overrides) -> Trainer:
  run = Trainer.create(config(mesh_model=mesh_model or 1, **overrides), str(tmp_path))
  if mesh_model is not None:
    assert dict(run.placement.mesh.shape) == {'data': 8 // mesh_model, 'model': mesh_model}
  return run


def per_device_rows(run: Trainer, batch, mesh_model: int | None) -> int:
  """Positions each device's kernels take: a share of every device's, on any mesh."""
  return batch['inputs'].size // (1 if mesh_model is None else run.placement.mesh.size)


@pytest.mark.parametrize('mesh_model', MESHES)
def test_pallas_attention_trains_like_the_plain_one(tmp_path, mesh_model):
  # Head size 16 (Triton's smallest tile) and windows of 16: the kernel runs in every block
  # (Pallas's interpreter), with the test config's dropout on the weights; on one device, or
  # on each device's rows (its dropout masks those of the batch's rows).
  run = run_on(tmp_path, mesh_model, hidden_units=32, attention_impl='plain')
  batch = first_batch(run)
  assert batch['inputs'].shape[1] == 16
  plain, pallas, calls = three_steps_each_way(run, batch, mesh_model is not None,
                                              attention_impl='pallas')
  assert_same_params(pallas, plain)
  assert len(calls) == 2 * run.config.num_blocks
  sequences = per_device_rows(run, batch, mesh_model) // 16
  # The queries, keys and values: a device's sequences x 16 positions x 2 heads x 16.
  assert set(re.findall(r'tensor<(\d+)x16x2x16xf32>', ' '.join(calls))) == {str(sequences)}


@pytest.mark.parametrize('mesh_model', MESHES)
def test_pallas_layer_norm_trains_like_flax_s(tmp_path, mesh_model):
  # Width 16 and 512 rows a step (64 a device on the tests' eight): every LayerNorm runs the
  # kernels (Pallas's interpreter), on each device's own rows on a mesh.
  run = run_on(tmp_path, mesh_model)
  batch = first_batch(run)
  flax_s, pallas, calls = three_steps_each_way(run, batch, mesh_model is not None,
                                               layer_norm_impl='pallas')
  assert_same_params(pallas, flax_s)
  layer_norms = 2 * run.config.num_blocks + 1
  assert len(calls) == 2 * layer_norms
  rows, width = per_device_rows(run, batch, mesh_model), 16
  # Each device's own rows: the step's whole batch would be every device's under GSPMD.
  assert set(re.findall(r': \(tensor<(\d+x\d+)x', ' '.join(calls))) == {f'{rows}x{width}'}


@pytest.mark.parametrize('mesh_model', MESHES)
def test_pallas_feed_forward_trains_like_the_xla_one(tmp_path, mesh_model):
  # Width 16 and 512 rows a step (64 a device on the tests' eight), with the test config's
  # dropout: every block's second half runs the kernels (Pallas's interpreter), on each
  # device's own rows, and their dropout masks, on a mesh.
  run = run_on(tmp_path, mesh_model)
  batch = first_batch(run)
  assert run.config.dropout > 0
  xla, pallas, calls = three_steps_each_way(run, batch, mesh_model is not None,
                                            ffn_impl='pallas')
  assert_same_params(pallas, xla)
  assert len(calls) == 2 * run.config.num_blocks
  rows = per_device_rows(run, batch, mesh_model)
  # Each call's operands: the dropout seeds, then the rows.
  assert set(re.findall(r': \(tensor<8xui32>, tensor<(\d+x\d+)x', ' '.join(calls))) == {
      f'{rows}x16'}


def three_steps_each_way(run: Trainer, batch, data_parallel: bool, **model_overrides):
  """Parameters after three train steps of `run`'s model and of the model with
  `model_overrides`, on one device or data-parallel on `run`'s mesh; and the Triton calls
  the second's step lowers to for a GPU."""
  mesh = run.placement.mesh if data_parallel else None
  other = run.config.copy_and_resolve_references()
  other.update(model_overrides)
  model = encoder.create_model(other, run.dataset.num_items, deterministic=False, mesh=mesh)
  step = jax.jit(functools.partial(steps.train_step, mesh=mesh, microbatches=1,
                                   learning_rate=run.config.learning_rate,
                                   **steps.loss_options(run.config, run.dataset.num_items)))
  before, after = (params_after_three_steps(step, run.state.replace(apply_fn=apply_fn), batch,
                                            run.dropout_rng)
                   for apply_fn in (run.state.apply_fn, model.apply))
  text = step.trace(run.state.replace(apply_fn=model.apply), batch, run.dropout_rng).lower(
      lowering_platforms=('cuda',)).as_text()
  calls = [line for line in text.splitlines() if 'custom_call @__gpu$xla.gpu.triton' in line]
  return before, after, calls


def params_after_three_steps(step, state, batch, rng):
  for _ in range(3):
    state, metrics = step(state, batch, rng)
    assert bool(metrics['finite'])
  return jax.tree.map(np.asarray, state.params)


def assert_same_params(got, expected):
  """Leaf by leaf, to float tolerance. Key biases have a true gradient of zero (softmax
  ignores a constant added to a row of logits): they hold rounding noise only, which Adam
  scales up."""
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                          jax.tree.leaves(got)):
    if "['key']['bias']" not in jax.tree_util.keystr(path):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def pallas_step(run: Trainer, ce_impl: str, mesh):
  return functools.partial(steps.train_step, mesh=mesh, microbatches=1,
                           learning_rate=run.config.learning_rate,
                           **{**steps.loss_options(run.config, run.dataset.num_items),
                              'ce_impl': ce_impl})


@pytest.fixture(scope='module')
def one_epoch_run(once_per_run):
  """A workdir of `config(max_epochs=1)`, trained once for the tests that copy it."""
  with once_per_run('train_test_one_epoch') as (root, build):
    if build:
      cfg = test_config.get_config()  # config(max_epochs=1), its data in the shared directory
      cfg.max_epochs, cfg.data_dir = 1, str(root / 'data')
      jobs.train(cfg, str(root / 'run'))
  return root / 'run'


@pytest.mark.parametrize('field,value', [
    ('hidden_units', 32), ('batch_size', 16), ('prng_impl', 'threefry2x32'), ('loss', 'bce'),
    ('learning_rate', 0.5), ('dtype', 'bfloat16')])
def test_a_workdir_of_another_configuration_is_refused(tmp_path, field, value, one_epoch_run):
  # batch_size, prng_impl and loss used to be missing: a resumed run reused an iterator state
  # made for other batches.
  workdir = str(tmp_path / 'run')
  shutil.copytree(one_epoch_run, workdir)
  with pytest.raises(workdir_lib.WorkdirMismatchError, match=rf'{field}: .* there, .* here'):
    jobs.train(config(**{field: value}), workdir)
  # Limits and settings that compute the same function may change.
  assert jobs.evaluate(
      config(max_epochs=5, eval_batch_size=128, attention_impl='xla', microbatches=2),
      workdir)['test']


def test_microbatch_rows_are_spread_and_merge_back():
  x = np.arange(12).reshape(12, 1)
  micro = np.asarray(microbatching.split_microbatches(x, 3))
  np.testing.assert_array_equal(micro[:, :, 0], [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
  np.testing.assert_array_equal(microbatching.merge_microbatches(micro), x)


def test_microbatch_count_follows_the_backend():
  # CPU: ~2,048 positions a microbatch, a divisor of the rows; accelerators: the whole batch.
  assert microbatching.microbatches_for(256, 128, 'cpu') == 16
  assert microbatching.microbatches_for(96, 128, 'cpu') == 6
  assert microbatching.microbatches_for(64, 32, 'cpu') == 1
  assert microbatching.microbatches_for(256, 128, 'gpu') == 1


def trainable_leaves(run: Trainer):
  # Key biases have a true gradient of zero (softmax ignores a constant added to a row of
  # logits): they hold rounding noise only, which Adam scales up.
  return [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params_of(run))[0]
          if "['key']['bias']" not in jax.tree_util.keystr(path)]


def test_microbatches_give_the_whole_batch_gradient(tmp_path):
  # Dropout on: each microbatch draws the masks of its rows in the whole batch.
  runs = [Trainer.create(config(dropout=0.3, microbatches=n), str(tmp_path / str(n)))
          for n in (1, 4)]
  assert [run.placement.train_microbatches for run in runs] == [1, 4]
  batches = [run.placement.shard_batch(b) for run in runs[:1] for b in run.inputs.epoch(0)][:3]
  for run in runs:
    for batch in batches:
      step_on(run, batch)
  for (path, a), (_, b) in zip(*map(trainable_leaves, runs)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=path)


def test_length_sorted_microbatches_fill_their_positions_longest_first():
  # Histories of 5, 1, 9, 3, 2, 7, 4, 12 items (maxlen 16), 32 positions per shard: two rows
  # 16 wide, then four 8 wide, then the last two 8 wide filled up with no rows (-1).
  lengths = [5, 1, 9, 3, 2, 7, 4, 12]
  inputs = np.array([[0] * (16 - n) + [1] * n for n in lengths])
  groups = microbatching.length_sorted_microbatches(inputs, data_shards=1, positions=32, maxlen=16)
  assert [(rows.tolist(), width) for rows, width in groups] == [
      ([7, 2], 16), ([5, 0, 6, 3], 8), ([4, 1, -1, -1], 8)]
  # Two data shards: each takes its share of every microbatch.
  groups = microbatching.length_sorted_microbatches(inputs, data_shards=2, positions=32, maxlen=16)
  assert [(rows.tolist(), width) for rows, width in groups] == [
      ([7, 2, 5, 0], 16), ([6, 3, 4, 1, -1, -1, -1, -1], 8)]
  # Keeping a padding column: 8 items need a window of 16, 4 items one of 8.
  lengths = [5, 1, 9, 3, 2, 8, 4, 12]
  inputs = np.array([[0] * (16 - n) + [1] * n for n in lengths])
  groups = microbatching.length_sorted_microbatches(inputs, data_shards=1, positions=32, maxlen=16,
                                            padding_column=True)
  assert [(rows.tolist(), width) for rows, width in groups] == [
      ([7, 2], 16), ([5, 0], 16), ([6, 3, 4, 1], 8)]


@pytest.mark.parametrize('padding', ['masked', 'visible'])
def test_length_sorted_microbatches_give_the_whole_batch_step(tmp_path, padding):
  # Histories of 2-30 items in 32-wide windows, dropout on: one program over whole windows,
  # or four microbatches of similar lengths in windows of their own.
  runs = {}
  for name, overrides in {'whole': {'microbatches': 1, 'trim_windows': False},
                          'sorted': {'microbatches': 4}}.items():
    if padding == 'visible':
      overrides = {**overrides, **AUTHORS_PADDING}
    cfg = config(dropout=0.3, maxlen=32, **overrides)
    cfg.synthetic.min_length, cfg.synthetic.max_length = 2, 30
    runs[name] = Trainer.create(cfg, str(tmp_path / name))
  assert runs['sorted'].placement.sorts_microbatches
  assert not runs['whole'].placement.sorts_microbatches
  batches = {name: list(run.inputs.epoch(0))[:3] for name, run in runs.items()}
  widths = {width for batch in batches['sorted']
            for _, width in runs['sorted'].placement.microbatches_of(batch['inputs'])}
  assert len(widths) > 1 and max(widths) <= 32
  step_losses = {name: [float(run.train_on(batch)['loss_sum']) for batch in batches[name]]
                 for name, run in runs.items()}
  np.testing.assert_allclose(step_losses['sorted'], step_losses['whole'], rtol=1e-5)
  for (path, a), (_, b) in zip(*map(trainable_leaves, runs.values())):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=path)


def test_bfloat16_loss_follows_float32(tmp_path):
  losses_by_dtype = {}
  for dtype in ('float32', 'bfloat16'):
    run = Trainer.create(config(dropout=0.0, dtype=dtype, learning_rate=1e-2),
                         str(tmp_path / dtype))
    curve = []
    for epoch in range(6):
      for batch in run.inputs.epoch(epoch):
        metrics = step_on(run, run.placement.shard_batch(batch))
        curve.append(float(metrics['loss_sum'] / metrics['loss_count']))
    losses_by_dtype[dtype] = np.array(curve)
  full, half = losses_by_dtype['float32'], losses_by_dtype['bfloat16']
  assert len(full) >= 30
  assert full[-1] < 0.9 * full[0]  # the curve moves, so following it means something
  # bfloat16 activations (8-bit mantissa) with float32 parameters, softmax and loss sums:
  # within 0.5% of the float32 loss at every one of the 36 steps (0.08% seen at worst).
  np.testing.assert_allclose(half, full, rtol=0.005)


def test_one_finiteness_test_steps_as_optax_s_apply_if_finite():
  # A finite step, a NaN in a bias (skipped), an infinity in the item table (a second error
  # in a row: past max_consecutive_errors=1, so applied), then a finite one.
  params = {'item_emb': {'embedding': np.arange(12.0).reshape(4, 3)},
            'block': {'kernel': np.ones((3, 2)), 'bias': np.zeros(2)}}
  finite = jax.tree.map(lambda p: np.cos(np.arange(p.size)).reshape(p.shape) * 0.1, params)
  nan_bias = jax.tree.map(np.copy, finite)
  nan_bias['block']['bias'][1] = np.nan
  inf_table = jax.tree.map(np.copy, finite)
  inf_table['item_emb']['embedding'][2, 0] = np.inf
  ours = optimizer.apply_if_all_finite(optax.adam(0.1), max_consecutive_errors=1)
  optax_s = optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=1)
  states = [(params, tx.init(params)) for tx in (ours, optax_s)]
  for grads in (finite, nan_bias, inf_table, finite):
    for i, tx in enumerate((ours, optax_s)):
      p, state = states[i]
      updates, state = jax.jit(tx.update)(grads, state, p)
      states[i] = (optax.apply_updates(p, updates), state)
    chex.assert_trees_all_equal(states[0], states[1])  # NaNs equal NaNs
  assert int(states[0][1].total_notfinite) == 2


def test_a_learning_rate_given_to_the_step_moves_as_optax_adam_at_that_rate():
  # The rate is an input of the step's program (runs at several rates share it,
  # placement_test); here the parameters and moments follow optax.adam at that rate bit for
  # bit, a skipped non-finite step included.
  config = test_config.get_config()
  params = {'item_emb': {'embedding': np.arange(12.0, dtype=np.float32).reshape(4, 3)},
            'block': {'bias': np.zeros(2, np.float32)}}
  grads = [jax.tree.map(lambda p, k=k: np.sin(np.arange(p.size) + k).reshape(p.shape)
                        .astype(np.float32) * 0.3, params) for k in range(3)]
  grads[1]['block']['bias'][0] = np.nan
  for rate in (3e-4, 1e-2):
    ours = train_state.TrainState.create(apply_fn=None, params=params,
                                         tx=optimizer.adam(config))
    optax_s = train_state.TrainState.create(
        apply_fn=None, params=params, tx=optimizer.apply_if_all_finite(
            optax.adam(rate, b1=config.adam_b1, b2=config.adam_b2), 2**31 - 1))
    ours_step = jax.jit(optimizer.apply_learning_rate)
    for g in grads:
      ours = ours_step(ours, g, rate)
      optax_s = jax.jit(lambda state, g: state.apply_gradients(grads=g))(optax_s, g)
      chex.assert_trees_all_equal((ours.params, ours.opt_state),
                                  (optax_s.params, optax_s.opt_state))
    assert not np.array_equal(ours.params['block']['bias'], params['block']['bias'])


def test_finiteness_is_one_reduction_besides_the_item_table_s():
  # optax reduces every leaf on its own (on a GPU, a kernel each), then their flags.
  params = {'item_emb': {'embedding': np.ones((4, 3))},
            **{f'block_{i}': {'kernel': np.ones((3, 2)), 'bias': np.ones(2)} for i in range(5)}}
  count = lambda tx: sum(eqn.primitive.name == 'reduce_and' for eqn in jaxprs.equations(
      jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr))
  assert count(optax.apply_if_finite(optax.adam(0.1), 1)) == 11 + 1
  assert count(optimizer.apply_if_all_finite(optax.adam(0.1), 1)) == 2
