"""Model FLOPs: a hand count, and XLA's own count of the compiled programs."""

import functools

import jax
import jax.numpy as jnp
import pytest

from configs import default
from pka_jax.model import encoder
from pka_jax.model import flops
from pka_jax.model.encoder import Encoder, ModelConfig
from pka_jax.training import optimizer
from pka_jax.training import steps


def test_hand_count_of_a_tiny_pka_model():
  config = ModelConfig(num_items=10, maxlen=4, num_blocks=2, hidden_units=8, num_heads=2,
                       dropout=0.0, position_mode='kernel')
  # One block, all 4 queries: K, V projections 2·2·T·d² = 1,024; Q, O, FFN in and out
  # 4·2·T·d² = 2,048; Q Kᵀ and A V 2·2·T·T·d = 512; the Toeplitz (K) and full (V) kernels,
  # each min(2·T²·d, 2·H·T·T²) = min(256, 256) = 256. Total 4,096.
  assert flops.block_flops(config) == 4096
  # The newest query alone: 1,024 + 4·2·1·d² = 1,536; attention 2·2·1·T·d = 128; kernels on
  # the logits of one row, 2·H·1·T² = 64 each. Total 1,792.
  assert flops.block_flops(config, num_queries=1) == 1792
  # Loss over the catalog: 2·T·d·N = 640 a sequence. Train step, batch 3: 3·3·(2·4,096 + 640).
  assert flops.train_step_flops(config, batch_size=3) == 79_488
  # With 5 of the 12 positions holding a real target, the loss counts those: 3·(2·3·4,096 +
  # 5·2·d·N).
  assert flops.train_step_flops(config, batch_size=3, real_targets=5) == 3 * (24_576 + 800)
  # Windows trimmed to 2 positions: 3 sequences of two full blocks at T = 2 (1,728 each).
  assert flops.train_step_flops(config, batch_size=3, real_targets=5, width=2) == 3 * (
      3 * 2 * 1728 + 800)
  # Evaluation pair: a full block, the one-query block, and 2·d·N = 160 to score every item.
  assert flops.eval_pair_flops(config) == 4096 + 1792 + 160
  # A window trimmed to its last 2 positions. Full block: projections 2·2·2·d² + 4·2·2·d² =
  # 1,536; attention 2·2·2·2·d = 128; kernels min(2·2²·d, 2·H·2·2²) = 32 each. Total 1,728.
  # One-query block: 512 + 512; attention 2·2·1·2·d = 64; kernels 2·H·1·2² = 16 each: 1,120.
  assert flops.eval_pair_flops(config, width=2) == 1728 + 1120 + 160


@pytest.mark.parametrize('model', ['pka', 'sasrec', 'rope', 'cope', 'nope'])
def test_xla_counts_the_same_matrix_products_plus_elementwise_work(model):
  # XLA counts every FLOP of the compiled step (softmax, layer norms, Adam too); ours counts
  # the matrix products. A missing or doubled term (attention is ~14% of a block here, the
  # kernels ~4%) would move the ratio out of its band.
  config = default.get_config(f'model={model}')
  config.maxlen, config.hidden_units, config.num_blocks, config.num_heads = 32, 64, 2, 1
  batch_size, num_items = 16, 500
  model = encoder.create_model(config, num_items, deterministic=True)
  state = optimizer.create_train_state(model, config, jax.random.key(0))
  inputs = jnp.ones((batch_size, config.maxlen), jnp.int32)
  step = functools.partial(steps.train_step, learning_rate=config.learning_rate,
                           loss_name='ce',
                           ce_chunk_rows=batch_size * config.maxlen)  # one chunk: no loop
  compiled = jax.jit(step).lower(state, {'inputs': inputs, 'targets': inputs},
                                 jax.random.key(1)).compile()
  ratio = compiled.cost_analysis()['flops'] / flops.train_step_flops(model.config, batch_size)
  assert 1.0 < ratio < 1.12
  score = jax.jit(lambda p, x: model.apply({'params': p}, x, method=Encoder.score_last))
  for width in (config.maxlen, 8):  # full and trimmed windows
    compiled = score.lower(state.params, inputs[:, -width:]).compile()
    per_pair = compiled.cost_analysis()['flops'] / batch_size
    assert 1.0 < per_pair / flops.eval_pair_flops(model.config, width) < 1.12
