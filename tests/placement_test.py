"""Placement: one per program spec and devices, shared by runs whose configs differ only in what
their programs do not read (seed, data, length, bookkeeping) or take as an input (the learning
rate), and sharing changes no result."""

import jax
import numpy as np
import pytest

from configs import test as test_config
from pka_jax import config_check
from pka_jax.training.loop import Trainer
from pka_jax.training.placement import Placement, ProgramSpec

NUM_ITEMS = 60


def settled(**overrides):
  config = test_config.get_config()
  config.update(overrides)
  config_check.settle(config, devices=jax.device_count())
  return config


def test_configs_that_differ_outside_the_programs_share_one_placement():
  base = Placement.of(settled(), NUM_ITEMS)
  for outside in ({'seed': 3}, {'learning_rate': 0.5}, {'max_epochs': 9, 'patience': 1},
                  {'data_dir': '/elsewhere'}, {'checkpoint_every_steps': 2, 'log_every_steps': 7}):
    assert Placement.of(settled(**outside), NUM_ITEMS) is base, outside


@pytest.mark.parametrize('inside', [
    {'dropout': 0.0}, {'adam_b2': 0.9}, {'eval_batch_size': 128}, {'top_k': 5},
    {'batch_size': 64}, {'microbatches': 2}, {'ce_block_size': 16}, {'hidden_units': 32},
    {'mask_padding_keys': False}, {'trim_windows': False}, {'loss': 'bce'}])
def test_a_config_that_changes_a_program_gets_its_own(inside):
  base = Placement.of(settled(), NUM_ITEMS)
  other = Placement.of(settled(**inside), NUM_ITEMS)
  assert other is not base
  assert ProgramSpec.of(settled(**inside), NUM_ITEMS) != base.spec
  assert Placement.of(settled(), NUM_ITEMS + 1) is not base  # another catalog
  assert Placement.of(settled(), NUM_ITEMS, devices=jax.devices()[:1]) is not base


def params_after_steps(run: Trainer, steps: int = 2) -> list:
  for batch in list(run.inputs.epoch(0))[:steps]:
    run.train_on(batch)
  return [np.asarray(x) for x in jax.tree.leaves(run.state.params)]


@pytest.mark.parametrize('field, value', [('seed', 1), ('learning_rate', 1e-2)])
def test_a_shared_placement_trains_as_a_fresh_one(tmp_path, field, value):
  # Runs of two seeds, or two learning rates (an input of the train step), share the
  # placement, not their parameters; a run on a placement built fresh for it ends where the
  # same run on the shared one does.
  config = settled()
  config.data_dir = str(tmp_path / 'data')
  first = Trainer.create(config, str(tmp_path / 'first'))
  other_config = config.copy_and_resolve_references()
  other_config[field] = value
  other = Trainer.create(other_config, str(tmp_path / 'other'))
  assert other.placement is first.placement
  fresh = Trainer(other_config, str(tmp_path / 'fresh'), first.dataset,
                  Placement(ProgramSpec.of(other_config, first.dataset.num_items)))
  assert fresh.placement is not first.placement
  shared, own, base = map(params_after_steps, (other, fresh, first))
  for a, b in zip(shared, own, strict=True):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(shared, base))
