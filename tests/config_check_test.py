"""Configuration checks: each problem is named by its field, all of them in one message."""

from ml_collections import ConfigDict
import pytest

from configs import default
from configs import test as test_config
from pka_jax import config_check


def config(variant: str | None = None, **overrides):
  cfg = test_config.get_config(variant)
  for key, value in overrides.items():
    if '.' in key:
      group, field = key.split('.')
      cfg[group][field] = value
    else:
      cfg[key] = value
  return cfg


def test_the_shipped_configs_pass():
  for model in default.MODEL_POSITIONS:
    config_check.check(test_config.get_config(f'model={model}'))
  for layout in default.KERNEL_LAYOUTS:
    config_check.check(test_config.get_config(f'model=pka,kernel={layout}'))


@pytest.mark.parametrize('overrides,variant,field', [
    (dict(dataset='movielens-42'), None, 'dataset'),
    (dict(model='bert'), None, 'model'),
    (dict(position_mode='absolute'), None, 'position_mode'),  # model pka uses 'kernel'
    (dict(kernel_k_side='diagonal'), None, 'kernel_k_side'),
    (dict(kernel_k_side='none', kernel_v_side='none'), None, 'kernel_k_side, kernel_v_side'),
    (dict(maxlen=1), None, 'maxlen'),
    (dict(num_blocks=0), None, 'num_blocks'),
    (dict(hidden_units=0), None, 'hidden_units'),
    (dict(dropout=1.0), None, 'dropout'),
    (dict(dropout=-0.1), None, 'dropout'),
    (dict(num_heads=3), None, 'num_heads'),  # 16 hidden units
    (dict(hidden_units=6, num_heads=2), 'model=rope', 'hidden_units'),  # head size 3 is odd
    (dict(q_valid=0.98), None, 'q_valid, q_test'),  # after q_test 0.97
    (dict(q_test=1.0), None, 'q_valid, q_test'),
    (dict(max_eval=0), None, 'max_eval'),
    (dict(learning_rate=0.0), None, 'learning_rate'),
    (dict(adam_b2=1.0), None, 'adam_b2'),
    (dict(loss='mse'), None, 'loss'),
    (dict(dtype='float16'), None, 'dtype'),
    (dict(attention_impl='flash'), None, 'attention_impl'),
    (dict(attention_impl='pallas'), None, 'attention_impl'),  # Triton; the tests run on a CPU
    (dict(layer_norm_impl='pallas'), None, 'layer_norm_impl'),
    (dict(layer_norm_impl='triton'), None, 'layer_norm_impl'),
    (dict(ffn_impl='pallas'), None, 'ffn_impl'),
    (dict(ffn_impl='fused'), None, 'ffn_impl'),
    (dict(dropout_impl='philox'), None, 'dropout_impl'),
    (dict(prng_impl='mt19937'), None, 'prng_impl'),
    (dict(batch_size=0), None, 'batch_size'),
    (dict(microbatches=3), None, 'microbatches'),  # 32 sequences per device
    (dict(max_epochs=0), None, 'max_epochs'),
    (dict(patience=0), None, 'patience'),
    (dict(top_k=0), None, 'top_k'),
    (dict(eval_batch_size=-1), None, 'eval_batch_size'),
    (dict(ce_block_size=-5), None, 'ce_block_size'),
    (dict(ce_impl='cuda'), None, 'ce_impl'),
    (dict(ce_impl='pallas'), None, 'ce_impl'),  # Triton kernels; the tests run on a CPU
    (dict(checkpoint_every_steps=-1), None, 'checkpoint_every_steps'),
    (dict(log_every_steps=0), None, 'log_every_steps'),
    ({'synthetic.num_items': 0}, None, 'synthetic.num_items'),
    ({'synthetic.min_length': 30}, None, 'synthetic.min_length'),  # max_length 20
    ({'synthetic.noise': 2.0}, None, 'synthetic.noise'),
])
def test_each_problem_names_its_field(overrides, variant, field):
  with pytest.raises(config_check.ConfigError, match=rf'(^|; |: ){field}: ') as raised:
    config_check.check(config(variant, **overrides))
  assert raised.value.args[0].count('; ') == 0  # only this problem


@pytest.mark.parametrize('field,value', [('batch_size', 36), ('eval_batch_size', 100)])
def test_batch_sizes_must_divide_over_the_devices(field, value):
  config_check.check(config(**{field: value}), devices=1)
  with pytest.raises(config_check.ConfigError, match=f'{field}: expected a multiple of the 8'):
    config_check.check(config(**{field: value}), devices=8)
  with pytest.raises(config_check.ConfigError, match=f'{field}: .* 3 processes'):
    config_check.check(config(**{field: value}), devices=3, processes=3)


def test_the_mesh_model_axis_divides_the_devices_and_sets_the_data_shards():
  with pytest.raises(config_check.ConfigError, match='mesh_model: expected a divisor of the 8'):
    config_check.check(config(mesh_model=3), devices=8)
  # 8 devices as 2 data shards x 4 model shards: a batch of 36 splits over the 2 data shards.
  config_check.check(config(batch_size=36, eval_batch_size=36, mesh_model=4), devices=8)


def test_the_pallas_loss_says_what_it_needs():
  # The tests run on a CPU: the GPU problem comes first, then each unmet need.
  with pytest.raises(config_check.ConfigError) as raised:
    config_check.check(config(ce_impl='pallas', loss='bce', mesh_model=2), devices=8)
  message = raised.value.args[0]
  assert "ce_impl: 'pallas' runs Triton kernels and needs a GPU, not this cpu backend" in message
  assert "ce_impl: 'pallas' is a cross-entropy, but loss is 'bce'" in message
  assert "needs the whole item table on each device (mesh_model 1), got mesh_model 2" in message
  assert message.startswith('invalid configuration (3 problems)')


def test_every_problem_in_one_message():
  with pytest.raises(config_check.ConfigError) as raised:
    config_check.check(config(maxlen=1, dropout=2.0, loss='mse', num_heads=5))
  message = raised.value.args[0]
  assert message.startswith('invalid configuration (4 problems): ')
  assert '\n' not in message
  for field in ('maxlen', 'dropout', 'loss', 'num_heads'):
    assert f'{field}: ' in message


def test_a_cpu_is_split_into_the_most_devices_that_divide_the_batches():
  def config(**fields):
    return ConfigDict({'batch_size': 256, 'eval_batch_size': 512, 'mesh_model': 1,
                       'microbatches': 0, **fields})

  assert config_check.cpu_devices_for([config()], cores=2) == 2
  assert config_check.cpu_devices_for([config()], cores=1) == 1
  # 96 and 100 share the divisors 1, 2 and 4.
  assert config_check.cpu_devices_for([config(batch_size=96, eval_batch_size=100)], cores=8) == 4
  # A grid: every run's batches; 200 = 8 x 25 is the one 16 does not divide.
  assert config_check.cpu_devices_for([config(), config(batch_size=200)], cores=16) == 8
  # 32 microbatches of 256 / 16 = 16 rows per device would not divide; of 256 / 8 they do.
  assert config_check.cpu_devices_for([config(microbatches=32)], cores=16) == 8
  assert config_check.cpu_devices_for([config(mesh_model=2)], cores=8) == 1
  assert config_check.cpu_devices_for([config(batch_size='many')], cores=4) == 1
  # The backend's evaluation batch is chosen to fit the devices: only the 96 constrains.
  assert config_check.cpu_devices_for([config(batch_size=96, eval_batch_size=0)], cores=6) == 6


def test_the_backends_evaluation_batch_divides_over_shards_and_processes():
  def size(eval_batch_size=0, mesh_model=1, **where):
    config = ConfigDict({'eval_batch_size': eval_batch_size, 'mesh_model': mesh_model})
    return config_check.eval_batch_size_for(config, **where)

  assert size(100, backend='gpu', devices=8) == 100  # the config's own
  assert size(backend='cpu') == 512
  assert size(backend='cpu', devices=6) == 516  # 86 sequences a device
  assert size(backend='gpu') == 4096
  assert size(backend='tpu', devices=8, mesh_model=2) == 4096  # 4 data shards of 1,024
  assert size(backend='tpu', devices=8192, mesh_model=2) == 4096  # one a data shard
  # 4 shards and 3 processes: the multiple of 12 at or above 4,096.
  assert size(backend='gpu', devices=4, processes=3) == 4104
