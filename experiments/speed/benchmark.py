"""How close a config's training and evaluation come to the machine's peak.

  python -m experiments.speed.benchmark --config=configs/ml1m.py --synthetic_items=3416
  python -m experiments.speed.benchmark --config=configs/ml1m.py:model=sasrec \
      --synthetic_items=3416
  python -m experiments.speed.benchmark --config=configs/ml1m.py --synthetic_items=3416 \
      --config.dtype=bfloat16 --json=/tmp/bench.json
  python -m experiments.speed.benchmark --config=configs/ml1m.py --synthetic_items=3416 \
      --profile_dir=/tmp/trace  # and a profiler trace of the step and evaluation

Measures, in one process on the default backend: the dense-matmul peak in float32 and
bfloat16; the train step's compile time, step time (median and spread), sequences/s, model
FLOPs (pka_jax/model/flops.py, cross-checked with XLA's cost analysis of the same step without
microbatches or loss chunks, whose loops XLA would count once), MFU against the measured
peak of the config's dtype (and against the peak probed again beside each timed step, which
follows a shared machine's drift), peak memory; the successive evaluation's pairs/s (the whole
protocol, host batches included, and the device alone) and its MFU; with `--epochs`, the
share of an epoch spent outside training steps and validation; with `--profile_dir`, a
profiler trace and the traced step's HLO, which `python -m experiments.speed.trace_breakdown`
reads. Real-dataset configs run without their data on a synthetic catalog of
`--synthetic_items` items.
"""

import collections
import functools
import itertools
import json
import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from experiments.speed import trace_breakdown
from pka_jax import config_check
from pka_jax import files
from pka_jax import sharding
from pka_jax.model import flops
from pka_jax.model.encoder import Encoder
from pka_jax.training import checkpoint
from pka_jax.training import metric_writer
from pka_jax.training import steps
from pka_jax.training.loop import Trainer

config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed train steps after the warm-up.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed train steps after the compiling one.')
_EPOCHS = flags.DEFINE_integer('epochs', 0, 'Epochs of the real loop to time (0: none).')
_SYNTHETIC_ITEMS = flags.DEFINE_integer(
    'synthetic_items', 0, 'Replace the dataset by synthetic data with this many items.')
_SYNTHETIC_USERS = flags.DEFINE_integer(
    'synthetic_users', 0, 'Users of the synthetic data (0: four batches, at least 2,000; '
    "6,040 gives ML-1M's 23 steps an epoch at batch 256).")
_SYNTHETIC_MIN_LENGTH = flags.DEFINE_integer(
    'synthetic_min_length', 0, 'Shortest synthetic history (0: half the longest); histories '
    'are uniform between the two.')
_SYNTHETIC_MAX_LENGTH = flags.DEFINE_integer(
    'synthetic_max_length', 0, 'Longest synthetic history (0: maxlen + 1).')
_EVAL_REPEATS = flags.DEFINE_integer('eval_repeats', 2, 'Timed validation passes.')
_PROBE_SIZE = flags.DEFINE_integer(
    'probe_size', 0, 'Side of the square matmuls that time the peak (0: 2,048 on a CPU, 8,192 '
    'on an accelerator); a smaller one probes faster and finds a lower peak.', lower_bound=0)
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', None, 'Split a CPU into this many XLA devices, as pka_jax.main does (0: one '
    'per core), to train and evaluate on. Default: as pka_jax.main, one per core, evaluating '
    'on all and training on one.', lower_bound=0)
_JSON = flags.DEFINE_string('json', None, 'Also write the figures to this JSON file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Scratch workdir (default: a temporary one).')
_PROFILE_DIR = flags.DEFINE_string(
    'profile_dir', None, 'Also write a jax.profiler trace of a few train steps and evaluation '
    'batches here (TensorBoard/XProf or Perfetto read it): where the time goes.')


def use_synthetic_data(config, num_items: int, num_users: int, min_length: int = 0,
                       max_length: int = 0) -> None:
  """The config's shapes on generated data: by default enough users for a few batches."""
  config.dataset = 'synthetic'
  config.synthetic.num_items = num_items
  config.synthetic.num_users = num_users or max(config.batch_size * 4, 2000)
  config.synthetic.max_length = min(max_length or config.maxlen + 1, num_items - 1)
  config.synthetic.min_length = min_length or config.synthetic.max_length // 2


def peak_memory(compiled) -> dict:
  """Device peak bytes where the runtime reports them, and XLA's plan for the program."""
  analysis = compiled.memory_analysis()
  planned = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
             + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
  stats = jax.local_devices()[0].memory_stats() or {}
  return {'device_peak_bytes': stats.get('peak_bytes_in_use'), 'compiled_bytes': planned,
          'compiled_temp_bytes': analysis.temp_size_in_bytes}


def xla_flops(fn, *args, devices: int = 1) -> float:
  """XLA's FLOPs for `fn` on `devices` devices: its cost analysis counts one device's share."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return devices * float(cost.get('flops', float('nan')))


def time_train(run: Trainer, probe: flops.MatmulProbe) -> dict:
  batches = []
  while len(batches) < 1 + _WARMUP.value + _STEPS.value:
    batches.extend(run.inputs.epoch(len(batches)))
  batches = batches[:1 + _WARMUP.value + _STEPS.value]
  start = time.perf_counter()
  compiled = compiled_step(run, batches[0])
  compile_seconds = time.perf_counter() - start
  # Trimmed batches and length-sorted microbatches come in a few widths: one pass over the
  # batches compiles them all before the clock runs.
  for batch in batches:
    jax.block_until_ready(run.train_on(batch))
  seconds, peaks = [], []
  for i, batch in enumerate(batches):
    if i > _WARMUP.value:
      peaks.append(probe(repeats=3))
    start = time.perf_counter()
    jax.block_until_ready(run.train_on(batch))
    if i > _WARMUP.value:
      seconds.append(time.perf_counter() - start)
  timed = batches[_WARMUP.value + 1:]
  return {'compile_seconds': compile_seconds, 'seconds': np.array(seconds),
          'peaks': np.array(peaks), 'back_to_back_seconds': back_to_back(run, timed),
          'memory': peak_memory(compiled), 'batch': run.placement.shard_batch(batches[0]),
          'flops': [step_flops(run, b) for b in timed],
          'real_targets': [int(np.count_nonzero(b['targets'])) for b in timed],
          'widths': [microbatch_widths(run, b) for b in timed]}


def compiled_step(run: Trainer, batch):
  """The compiled program `run.train_on(batch)` runs."""
  placement = run.placement
  if placement.sorts_microbatches:
    return placement.sorted_step_fn.lower(run.state, placement.sorted_microbatches(batch),
                                          run.dropout_rng, run.config.learning_rate).compile()
  return placement.step_fn.lower(run.state, placement.shard_batch(batch), run.dropout_rng,
                                 run.config.learning_rate).compile()


def back_to_back(run: Trainer, batches: list) -> float:
  """Seconds a step with the steps dispatched one after another and one wait at the end, as
  the training loop runs them: the host prepares the next step while the device computes.
  On an accelerator a step alone also pays its launch and the wait for its result."""
  start = time.perf_counter()
  for batch in batches:
    outputs = run.train_on(batch)
  jax.block_until_ready(outputs)
  return (time.perf_counter() - start) / len(batches)


def window_counts(widths_per_step: list[list[tuple[int, int]]]) -> dict[int, float]:
  """How many programs a step ran at each window width, on average over the steps."""
  counts = collections.Counter(width for step in widths_per_step for _, width in step)
  return {width: counts[width] / len(widths_per_step) for width in sorted(counts)}


def microbatch_widths(run: Trainer, batch) -> list[tuple[int, int]]:
  """`(rows, width)` of each program the step runs on `batch`: the whole batch, or its
  length-sorted microbatches (Trainer.train_on)."""
  inputs = batch['inputs']
  if not run.placement.sorts_microbatches:
    return [inputs.shape]
  return [(len(rows), width) for rows, width in run.placement.microbatches_of(inputs)]


def step_flops(run: Trainer, batch) -> int:
  """Model FLOPs of the step on `batch` as it runs: each program's rows at its width and,
  since the cross-entropy skips chunks of padding, the loss over the real targets."""
  config, model_config = run.config, run.placement.model.config
  real = int(np.count_nonzero(batch['targets'])) if config.loss == 'ce' else None
  encoder = sum(flops.train_step_flops(model_config, rows, config.loss, 0, width)
                for rows, width in microbatch_widths(run, batch))
  loss = 3 * flops.loss_flops(model_config, config.loss,
                              real if real is not None else batch['targets'].size)
  return encoder + loss


def reference_step_flops(run: Trainer, batch) -> float:
  """XLA's FLOPs for the train step with no microbatches and one loss chunk."""
  config = run.config
  rows = config.batch_size * config.maxlen // run.placement.mesh.shape['data']
  step = functools.partial(
      steps.train_step, learning_rate=config.learning_rate, loss_name=config.loss,
      ce_block_size=0, ce_chunk_rows=rows,
      microbatches=1, mesh=run.placement.mesh, num_items=run.dataset.num_items)
  return xla_flops(step, run.state, batch, run.dropout_rng, devices=run.placement.mesh.size)


def eval_pass_flops(run: Trainer) -> tuple[int, dict[int, int]]:
  """Model FLOPs of a validation pass (real pairs only, each at its batch's window width)
  and how many pairs ran at each width: read off the batches the pass itself runs."""
  total, pairs_at = 0, collections.Counter()
  for batch in run.evaluator.batches('valid'):
    width, pairs = batch.inputs_BxT.shape[1], int(batch.valid_B.sum())
    total += pairs * flops.eval_pair_flops(run.placement.eval_model.config, width)
    pairs_at[width] += pairs
  return total, dict(sorted(pairs_at.items()))


def time_eval(run: Trainer, probe: flops.MatmulProbe) -> dict:
  """The validation pass end to end, and the device's share alone on one full-window batch."""
  valid_steps = run.evaluator.steps('valid')
  run.evaluate('valid')  # compiles for every seen-width of the pass
  seconds, peaks = [], []
  for _ in range(_EVAL_REPEATS.value):
    peaks.append(probe(repeats=3))
    start = time.perf_counter()
    run.evaluate('valid')
    seconds.append(time.perf_counter() - start)
  batch = valid_steps.batch(0, run.config.eval_batch_size,
                           shards=run.placement.eval_mesh.shape['data'])
  params = run.placement.eval_params(run.state.params)
  jax.block_until_ready(run.placement.rank(params, batch))
  device_seconds = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(run.placement.rank(params, batch))
    device_seconds.append(time.perf_counter() - start)
  score = lambda params, inputs: run.placement.eval_model.apply(
      {'params': params}, inputs, method=Encoder.score_last)
  xla = xla_flops(score, params,
                  run.placement.shard_rows(batch.inputs_BxT, run.placement.eval_batch_sharding),
                  devices=run.placement.eval_mesh.size)
  xla /= run.config.eval_batch_size
  pass_flops, pairs_at_width = eval_pass_flops(run)
  return {'pairs': len(valid_steps), 'seconds': float(np.median(seconds)),
          'mfu_probed': float(np.median(pass_flops / np.array(seconds) / np.array(peaks))),
          'pass_flops': pass_flops, 'pairs_at_width': pairs_at_width,
          'device_batch_seconds': float(np.median(device_seconds)), 'xla_flops_per_pair': xla}


def write_trace(run: Trainer, directory: str,
                steps: int = trace_breakdown.TRACED_STEPS) -> None:
  """A profiler trace of `steps` train steps and as many evaluation batches, compiled first,
  and the train step's optimised HLO beside it, for trace_breakdown.py. The
  steps all run the first batch: one program, the one the HLO describes (batches of other
  widths or microbatch splits compile to others, whose ops have other names)."""
  batches = [next(iter(run.inputs.epoch(0)))] * steps
  os.makedirs(directory, exist_ok=True)
  hlo_path = os.path.join(directory, trace_breakdown.HLO_FILE)
  with open(hlo_path + '.tmp', 'w') as f:
    f.write(compiled_step(run, batches[0]).as_text())
  os.replace(hlo_path + '.tmp', hlo_path)
  eval_batches = list(itertools.islice(run.evaluator.batches('valid'), steps))

  def run_all():
    for batch in batches:
      jax.block_until_ready(run.train_on(batch))
    params = run.placement.eval_params(run.state.params)
    for batch in eval_batches:
      jax.block_until_ready(run.placement.rank(params, batch))

  run_all()  # compiles every shape outside the trace
  # A segfault once ended this script in CI (Python 3.11), faulthandler cut off inside a
  # thread with no Python frames: most likely the profiler's Python tracer, which walks every
  # thread's state, meeting a thread as it ended. So the checkpoint threads finish first, and
  # that tracer is off: a device profile needs XLA's host and device events, not Python calls.
  checkpoint.wait(run.checkpoints)
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  with jax.profiler.trace(directory, profiler_options=options):
    run_all()


def time_epochs(run: Trainer, workdir: str) -> dict:
  """The real loop's epochs (`time/*` records), each after its own batches' steps alone:
  steps differ by batch (trimmed windows, length-sorted microbatches), so what the loop
  spends outside them is measured against the very batches it runs."""
  writer = metric_writer.MetricWriter(workdir)
  steps_seconds = []
  try:
    for _ in range(_EPOCHS.value):
      start = time.perf_counter()
      for batch in run.inputs.epoch(run.progress.epoch):  # the batches run_epoch runs next
        outputs = run.train_on(batch)
      jax.block_until_ready(outputs)
      steps_seconds.append(time.perf_counter() - start)
      run.run_epoch(writer)  # writes its time/* record
  finally:
    writer.close()
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    times = [json.loads(line) for line in f if 'time/other_s' in line]
  return {'epochs': times, 'steps_per_epoch': run.inputs.steps_per_epoch,
          'steps_seconds': steps_seconds}


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # no progress bars between the figures
  config = FLAGS.config
  if _SYNTHETIC_ITEMS.value:
    use_synthetic_data(config, _SYNTHETIC_ITEMS.value, _SYNTHETIC_USERS.value,
                       _SYNTHETIC_MIN_LENGTH.value, _SYNTHETIC_MAX_LENGTH.value)
  sharding.split_cpu(_CPU_DEVICES.value or config_check.cpu_devices_for([config]))
  device = jax.devices()[0]
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='pka_jax_benchmark_')
  try:  # first: a config this machine cannot run is refused before the peak is timed
    run = Trainer.create(config, workdir,
                    train_devices=sharding.devices_to_train(_CPU_DEVICES.value))
  except config_check.ConfigError as error:
    raise SystemExit(str(error)) from None  # a user's mistake: one line, no traceback
  probes = {name: flops.MatmulProbe(jnp.dtype(name), _PROBE_SIZE.value)
            for name in ('float32', 'bfloat16')}
  peaks = {name: probe() for name, probe in probes.items()}
  peak, probe = peaks[config.dtype], probes[config.dtype]
  model_config = run.placement.model.config
  logging.info('Timing the train step.')
  train_figures = time_train(run, probe)
  # Averaged over the timed batches, as they ran (step_flops).
  mean_step_flops = round(np.mean(train_figures['flops']))
  full_window_flops = flops.train_step_flops(model_config, config.batch_size, config.loss)
  step_seconds = train_figures['seconds']
  median = float(np.median(step_seconds))
  xla_step = reference_step_flops(run, train_figures['batch'])
  logging.info('Timing evaluation.')
  eval_figures = time_eval(run, probe)
  pair_flops = flops.eval_pair_flops(model_config)  # a full window
  pairs_per_second = eval_figures['pairs'] / eval_figures['seconds']
  device_pairs_per_second = config.eval_batch_size / eval_figures['device_batch_seconds']

  report = {
      'device': f'{device.platform} {device.device_kind} x{jax.device_count()}',
      'train_devices': run.placement.mesh.size, 'eval_devices': run.placement.eval_mesh.size,
      'jax': jax.__version__,
      'config': {'model': config.model, 'num_blocks': config.num_blocks,
                 'hidden_units': config.hidden_units, 'maxlen': config.maxlen,
                 'num_heads': config.num_heads, 'batch_size': config.batch_size,
                 'num_items': run.dataset.num_items, 'dtype': config.dtype,
                 'microbatches': run.placement.train_microbatches,
                 'attention_impl': config.attention_impl, 'loss': config.loss,
                 'ce_impl': config.ce_impl, 'eval_batch_size': config.eval_batch_size,
                 'trim_windows': run.placement.trims_windows,
                 'trim_evaluation': run.placement.evaluation_windows['trim']},
      'peak_flops': peaks, 'peak_probe_size': probe.size,
      'train': {
          'compile_seconds': train_figures['compile_seconds'],
          'step_seconds': median,
          'step_seconds_min': float(step_seconds.min()),
          'step_seconds_max': float(step_seconds.max()),
          'steps_timed': len(step_seconds),
          'sequences_per_second': config.batch_size / median,
          'real_targets': float(np.mean(train_figures['real_targets'])),
          'sorted_microbatches': run.placement.sorts_microbatches,
          'widths_per_step': window_counts(train_figures['widths']),
          'model_flops': mean_step_flops,
          'model_flops_full_windows': full_window_flops,
          'xla_flops': xla_step,
          'mfu': mean_step_flops / median / peak,
          'back_to_back_step_seconds': train_figures['back_to_back_seconds'],
          'back_to_back_mfu': mean_step_flops / train_figures['back_to_back_seconds'] / peak,
          # Each step against the peak probed just before it (flops.MatmulProbe), median.
          'mfu_probed': float(np.median(np.array(train_figures['flops']) / step_seconds
                                        / train_figures['peaks'])),
          'memory': train_figures['memory'],
      },
      'eval': {
          'pairs': eval_figures['pairs'],
          'pairs_per_second': pairs_per_second,
          'device_pairs_per_second': device_pairs_per_second,
          'pairs_at_width': eval_figures['pairs_at_width'],
          'model_flops': eval_figures['pass_flops'],
          'model_flops_per_pair': pair_flops,
          'xla_flops_per_pair': eval_figures['xla_flops_per_pair'],
          'mfu': eval_figures['pass_flops'] / eval_figures['seconds'] / peak,
          'mfu_probed': eval_figures['mfu_probed'],
          'device_mfu': device_pairs_per_second * pair_flops / peak,
      },
  }
  if _EPOCHS.value:
    logging.info('Timing %d epoch(s).', _EPOCHS.value)
    report['epochs'] = time_epochs(run, workdir)
  if _PROFILE_DIR.value:
    logging.info('Tracing into %s.', _PROFILE_DIR.value)
    write_trace(run, _PROFILE_DIR.value)
    report['profile_dir'] = _PROFILE_DIR.value
  run.checkpoints.close()
  print_report(report)
  if _JSON.value:
    files.write_text(_JSON.value, json.dumps(report, indent=2))
  logging.info('Done.')


def print_report(report: dict) -> None:
  c, t, e = report['config'], report['train'], report['eval']
  gflops = lambda x: f'{x / 1e9:,.1f} GFLOP'
  print(f"device      {report['device']} (jax {report['jax']}); training on "
        f"{report['train_devices']}, evaluating on {report['eval_devices']}")
  print(f"peak        float32 {report['peak_flops']['float32'] / 1e12:.3f} TFLOP/s, "
        f"bfloat16 {report['peak_flops']['bfloat16'] / 1e12:.3f} TFLOP/s (measured matmul)")
  print(f"model       {c['model']}: {c['num_blocks']} blocks, d {c['hidden_units']}, "
        f"T {c['maxlen']}, {c['num_heads']} head(s), {c['num_items']:,} items, "
        f"batch {c['batch_size']} ({c['microbatches']} microbatches), {c['dtype']}, "
        f"attention {c['attention_impl']}, loss {c['loss']} ({c['ce_impl']})")
  print(f"train step  {t['step_seconds'] * 1e3:,.1f} ms median "
        f"[{t['step_seconds_min'] * 1e3:,.1f}, {t['step_seconds_max'] * 1e3:,.1f}] over "
        f"{t['steps_timed']} steps; compile {t['compile_seconds']:.1f} s; "
        f"{t['sequences_per_second']:,.0f} sequences/s")
  positions = c['batch_size'] * c['maxlen']
  print(f"            {gflops(t['model_flops'])} model FLOPs/step, the loss over "
        f"{t['real_targets']:,.0f} real targets of {positions:,} positions; MFU "
        f"{100 * t['mfu']:.1f}% ({100 * t['mfu_probed']:.1f}% of the peak probed beside "
        "each step)")
  print(f"            back to back (as the training loop runs them): "
        f"{t['back_to_back_step_seconds'] * 1e3:,.1f} ms a step, MFU "
        f"{100 * t['back_to_back_mfu']:.1f}%")
  programs = ', '.join(f'{w}: {n:g}' for w, n in t['widths_per_step'].items())
  print(f"            programs per step by window width {{{programs}}}"
        + (' (length-sorted microbatches)' if t['sorted_microbatches'] else ''))
  print(f"            every position counted: {gflops(t['model_flops_full_windows'])}, XLA "
        f"{gflops(t['xla_flops'])} (ratio {t['xla_flops'] / t['model_flops_full_windows']:.3f})"
        # Seen on an H200: 0.41-0.56, the loss's three products among those left out.
        + (" (XLA's GPU cost analysis leaves out products run by cuBLAS: jax-ml/jax#22249)"
           if report['device'].startswith('gpu') else ''))
  memory = t['memory']
  device_peak = memory['device_peak_bytes']
  print(f"            memory: compiled {memory['compiled_bytes'] / 2**20:,.0f} MiB "
        f"(temporaries {memory['compiled_temp_bytes'] / 2**20:,.0f} MiB)"
        + (f", device peak {device_peak / 2**20:,.0f} MiB" if device_peak else ''))
  widths = ', '.join(f'{w}: {n:,}' for w, n in e['pairs_at_width'].items())
  print(f"evaluation  {e['pairs']:,} pairs: {e['pairs_per_second']:,.0f} pairs/s "
        f"(MFU {100 * e['mfu']:.1f}%, {100 * e['mfu_probed']:.1f}% probed); pairs per "
        f"window width {{{widths}}}"
        + (' (trimmed)' if c['trim_evaluation'] else ''))
  print(f"            {e['model_flops'] / e['pairs'] / 1e6:,.1f} model MFLOP/pair on average, "
        f"{e['model_flops_per_pair'] / 1e6:,.1f} at full width (XLA: "
        f"{e['xla_flops_per_pair'] / 1e6:,.1f}); a full-width batch alone on the device "
        f"{e['device_pairs_per_second']:,.0f} pairs/s (MFU {100 * e['device_mfu']:.1f}%)")
  for i, epoch in enumerate(report.get('epochs', {}).get('epochs', [])):
    total = epoch['time/train_s'] + epoch['time/valid_s'] + epoch['time/other_s']
    steps = report['epochs']['steps_per_epoch']
    steps_alone = report['epochs']['steps_seconds'][i]
    outside = total - steps_alone - epoch['time/valid_s']
    # Two parts: what the loop spends beside its steps (input, dispatch), which a machine
    # whose speed drifts between the two timings can make negative, and the rest of the
    # epoch (checkpoint, logging), timed by the loop itself.
    print(f"epoch {i + 1}     {total:.2f} s: train loop {epoch['time/train_s']:.2f} s "
          f"(its {steps} steps alone {steps_alone:.2f} s), validation "
          f"{epoch['time/valid_s']:.2f} s, outside both {outside:.2f} s "
          f"({100 * outside / total:.1f}%: {epoch['time/train_s'] - steps_alone:+.2f} s in "
          f"the train loop, {epoch['time/other_s']:.2f} s after it)")


FLAGS = flags.FLAGS

if __name__ == '__main__':
  app.run(main)
