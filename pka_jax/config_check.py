"""Checks a whole configuration before any work, and reports every problem in one message."""

from __future__ import annotations

from collections.abc import Callable, Iterable
import math
import os

import jax
import ml_collections

from configs import default
from pka_jax.data import registry
from pka_jax.kernels import dispatch
from pka_jax.model import attention
from pka_jax.model.dropout import DROPOUT_IMPLS
from pka_jax.model.encoder import DTYPES, POSITION_MODES

LOSSES = ('ce', 'bce')
PRNG_IMPLS = ('rbg', 'unsafe_rbg', 'threefry2x32')


class ConfigError(ValueError):
  """The configuration has problems; the message names each field and what it expects."""


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rules() -> list[tuple[str, Callable[[object], bool], str]]:
  """(field, test, expectation) for every field checked on its own."""
  positive_int = (lambda v: _is_int(v) and v > 0, 'an integer > 0')
  non_negative_int = (lambda v: _is_int(v) and v >= 0, 'an integer >= 0')
  one_of = lambda choices: (lambda v: v in choices, f'one of {list(choices)}')
  fraction = (lambda v: _is_number(v) and 0 <= v < 1, 'a number in [0, 1)')
  rules = {
      'dataset': one_of(['synthetic', *sorted(registry.DATASETS)]),
      'model': one_of(default.MODEL_POSITIONS),
      'position_mode': one_of(POSITION_MODES),
      'kernel_q_side': one_of(attention.KERNEL_KINDS),
      'kernel_k_side': one_of(attention.KERNEL_KINDS),
      'kernel_v_side': one_of(attention.KERNEL_KINDS),
      'maxlen': (lambda v: _is_int(v) and v >= 2, 'an integer >= 2'),
      'num_blocks': positive_int,
      'hidden_units': positive_int,
      'num_heads': positive_int,
      'dropout': fraction,
      'kernel_init_std': (lambda v: _is_number(v) and v >= 0, 'a number >= 0'),
      'dtype': one_of(DTYPES),
      'attention_impl': one_of(dispatch.ATTENTION_IMPLS),
      'dropout_impl': one_of(DROPOUT_IMPLS),
      'layer_norm_impl': one_of(dispatch.LAYER_NORM_IMPLS),
      'ffn_impl': one_of(dispatch.FFN_IMPLS),
      'loss': one_of(LOSSES),
      'ce_block_size': non_negative_int,
      'ce_chunk_rows': non_negative_int,
      'ce_impl': one_of(dispatch.CE_IMPLS),
      'learning_rate': (lambda v: _is_number(v) and v > 0, 'a number > 0'),
      'adam_b1': fraction,
      'adam_b2': fraction,
      'batch_size': positive_int,
      'microbatches': non_negative_int,
      'trim_windows': (lambda v: isinstance(v, bool), 'True or False'),
      'mesh_model': positive_int,
      'max_epochs': positive_int,
      'patience': positive_int,
      'seed': non_negative_int,
      'prng_impl': one_of(PRNG_IMPLS),
      'log_every_steps': positive_int,
      'checkpoint_every_steps': non_negative_int,
      'checkpoint_interval_s': (lambda v: _is_number(v) and v >= 0, 'a number >= 0'),
      'top_k': positive_int,
      'eval_batch_size': non_negative_int,
      'max_eval': positive_int,
  }
  return [(name, test, expected) for name, (test, expected) in rules.items()]


def _relations(config: ml_collections.ConfigDict, devices: int, processes: int) -> list[str]:
  """Problems between fields, and between the batch sizes and the machines."""
  problems = []
  model, mode = config.get('model'), config.get('position_mode')
  if model in default.MODEL_POSITIONS and mode != default.MODEL_POSITIONS[model]:
    problems.append(f'position_mode: model {model!r} uses '
                    f'{default.MODEL_POSITIONS[model]!r}, got {mode!r}')
  if mode == 'kernel' and all(config.get(f'kernel_{side}_side') == 'none' for side in 'qkv'):
    problems.append("kernel_k_side, kernel_v_side: PKA needs a kernel on some side, got 'none' "
                    'on every side')
  heads, hidden = config.get('num_heads'), config.get('hidden_units')
  if _is_int(heads) and _is_int(hidden) and heads > 0 and hidden > 0:
    if hidden % heads:
      problems.append(f'num_heads: expected a divisor of hidden_units {hidden}, got {heads}')
    elif mode == 'rotary' and (hidden // heads) % 2:
      problems.append(f'hidden_units: rotary embeddings need an even head size, got '
                      f'{hidden} / {heads} heads = {hidden // heads}')
  q_valid, q_test = config.get('q_valid'), config.get('q_test')
  if not (_is_number(q_valid) and _is_number(q_test) and 0 < q_valid < q_test < 1):
    problems.append(f'q_valid, q_test: expected 0 < q_valid < q_test < 1, got {q_valid!r} and '
                    f'{q_test!r}')
  problems += dispatch.config_problems(config)
  return problems + device_problems(config, devices, processes) + _synthetic_problems(config)


def device_problems(config: ml_collections.ConfigDict, devices: int, processes: int = 1
                    ) -> list[str]:
  """Problems between the mesh, the batch sizes and `devices` devices of `processes`."""
  problems = []
  mesh_model = config.get('mesh_model', 1)
  if _is_int(mesh_model) and mesh_model > 0 and devices % mesh_model:
    problems.append(f'mesh_model: expected a divisor of the {devices} devices, got {mesh_model}')
  data_shards = _data_shards(config, devices)
  for name in ('batch_size', 'eval_batch_size'):
    value = config.get(name)
    if _is_int(value) and value > 0 and value % math.lcm(data_shards, processes):
      problems.append(f'{name}: expected a multiple of the {data_shards} data shards '
                      f'({devices} devices, mesh_model {mesh_model}) and {processes} '
                      f'processes, got {value}')
  micro, batch = config.get('microbatches'), config.get('batch_size')
  if _is_int(micro) and micro > 0 and _is_int(batch) and batch > 0:
    per_shard = batch // data_shards
    if per_shard % micro:
      problems.append(f'microbatches: expected a divisor of the {per_shard} sequences per '
                      f'data shard (batch_size {batch} over {data_shards} shards), got {micro}')
  return problems


def _data_shards(config: ml_collections.ConfigDict, devices: int) -> int:
  """Devices along the mesh's 'data' axis: those the item table is not split over, where
  `mesh_model` divides them (`device_problems` names it where it does not)."""
  mesh_model = config.get('mesh_model', 1)
  if _is_int(mesh_model) and mesh_model > 0 and devices % mesh_model == 0:
    return devices // mesh_model
  return devices


# Evaluation sequences per batch where the config leaves it to the backend (eval_batch_size 0).
# A CPU scores a batch in cache-sized microbatches, and larger ones ran slower; an accelerator
# needs large batches to fill it: an H200 scored 2x the pairs/s with 4,096 as with 512 (ML-1M
# PKA shape, experiments/speed/benchmark.py). Not that many per device on a pod: a pass's last batch
# is padded to the full size and each batch runs in the window of its longest context, so a
# batch near a split's whole count of pairs would be mostly padding.
CPU_EVAL_BATCH = 512
ACCELERATOR_EVAL_BATCH = 4096


def eval_batch_size_for(config: ml_collections.ConfigDict, *, devices: int = 1,
                        processes: int = 1, backend: str | None = None) -> int:
  """`config.eval_batch_size`, or where it is 0 the backend's: CPU_EVAL_BATCH sequences on
  CPU, ACCELERATOR_EVAL_BATCH elsewhere, rounded up to a multiple of the data shards and
  processes (as `device_problems` asks)."""
  if config.get('eval_batch_size') != 0:
    return config.get('eval_batch_size')
  cpu = (backend or jax.default_backend()) == 'cpu'
  target = CPU_EVAL_BATCH if cpu else ACCELERATOR_EVAL_BATCH
  unit = math.lcm(_data_shards(config, devices), processes)
  return -(-target // unit) * unit


def cpu_devices_for(configs: Iterable[ml_collections.ConfigDict], cores: int | None = None
                    ) -> int:
  """Devices to split a CPU into when asked to choose: one per core (of `cores`, by default
  those this process may use), or the most below that with no `device_problems` for any
  config. One where the item table is split (`mesh_model` > 1), whose layout is the user's
  to give, or where nothing else fits (`check` then names what does not)."""
  cores = len(os.sched_getaffinity(0)) if cores is None else cores

  def fits(config, devices: int) -> bool:
    batch, eval_batch = config.get('batch_size'), config.get('eval_batch_size')
    return (config.get('mesh_model', 1) == 1 and _is_int(batch) and batch > 0
            and _is_int(eval_batch) and eval_batch >= 0  # 0: one that fits (eval_batch_size_for)
            and not device_problems(config, devices))

  configs = list(configs)
  return next((n for n in range(cores, 1, -1) if all(fits(c, n) for c in configs)), 1)


def _synthetic_problems(config: ml_collections.ConfigDict) -> list[str]:
  if config.get('dataset') != 'synthetic':
    return []
  synthetic = config.synthetic
  problems = [f'synthetic.{name}: expected an integer > 0, got {synthetic.get(name)!r}'
              for name in ('num_users', 'num_items', 'min_length', 'max_length')
              if not (_is_int(synthetic.get(name)) and synthetic.get(name) > 0)]
  lengths = synthetic.get('min_length'), synthetic.get('max_length')
  if all(_is_int(n) for n in lengths) and lengths[0] > lengths[1]:
    problems.append(f'synthetic.min_length: expected at most max_length {lengths[1]}, got '
                    f'{lengths[0]}')
  if not (_is_number(synthetic.get('noise')) and 0 <= synthetic.get('noise') <= 1):
    problems.append(f'synthetic.noise: expected a number in [0, 1], got {synthetic.get("noise")!r}')
  return problems


def field_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The problems of `config`'s fields each on its own (a value of the wrong type or range),
  each starting with the field."""
  found = []
  for name, test, expected in _rules():
    if name not in config:
      found.append(f'{name}: missing; expected {expected}')
    elif not test(config[name]):
      found.append(f'{name}: expected {expected}, got {config[name]!r}')
  return found


def problems(config: ml_collections.ConfigDict, *, devices: int = 1,
             processes: int = 1) -> list[str]:
  """Every problem of `config`, each starting with the field it concerns."""
  return field_problems(config) + _relations(config, devices, processes)


def check(config: ml_collections.ConfigDict, *, devices: int = 1, processes: int = 1) -> None:
  """Raises ConfigError listing every problem of `config`, if it has any."""
  found = problems(config, devices=devices, processes=processes)
  if found:
    raise ConfigError(f'invalid configuration ({len(found)} problem'
                      f'{"s" if len(found) > 1 else ""}): ' + '; '.join(found))


def settle(config: ml_collections.ConfigDict, *, devices: int = 1, processes: int = 1
           ) -> None:
  """Fills in what `config` leaves to the machine (`eval_batch_size` 0: the backend's, as
  `eval_batch_size_for` gives it), then `check`s it for `devices` of `processes`."""
  if config.get('eval_batch_size') == 0:
    config.eval_batch_size = eval_batch_size_for(config, devices=devices, processes=processes)
  check(config, devices=devices, processes=processes)
