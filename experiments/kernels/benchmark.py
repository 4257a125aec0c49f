"""One part of the training step alone, forward and backward: its XLA path against the Pallas
kernels (pka_jax/kernels/), timed and checked on the default device.

  python -m experiments.kernels.benchmark --kernel=attention   # ML-1M's PKA shape, bfloat16
  python -m experiments.kernels.benchmark --kernel=layer_norm --dtype=float32 \
      --json=/tmp/layer_norm.json
  python -m experiments.kernels.benchmark --kernel=ffn
  python -m experiments.kernels.benchmark --kernel=loss --tilings=64x128x4x2,128x64x8x3
  python -m experiments.kernels.benchmark --kernel=loss --dtype=float32 --rows=4096 \
      --items=64367 --block_sizes=16384  # Yelp's shape: the blockwise loss (config.ce_block_size)

`--kernel` picks the part; each variant is the jitted value and gradients of a weighted sum
of its output:

* `attention`: one attention layer as the encoder trains it (dropout on the weights, the
  Toeplitz kernel on the logits and the full kernel on the weights, padding keys masked); the
  gradients of its parameters, inputs and kernels. The plain path against the kernel
  (pka_jax/kernels/attention.py). Shape: `--batch --maxlen --width --heads --dropout`.
* `layer_norm`: the rows of a training step (batch × maxlen, width d) normalised; the
  gradients of the rows, the scale and the bias. flax's LayerNorm (`xla`) against the kernels
  (pka_jax/kernels/layer_norm.py). Shape: `--rows --width`.
* `ffn`: a batch of left-padded sequences through the encoder with dropout; the outputs and
  the gradients of every parameter. The two encoders differ only in `ffn_impl`, `xla` or the
  kernels of each block's second half (pka_jax/kernels/ffn.py), so the difference in time is
  the second halves'. Shape: `--batch --maxlen --width --blocks --items`.
* `loss`: one batch's full-catalog cross-entropy sum; the gradients of the hidden states and
  the item table. XLA's plans (`chunked`, the default loss, `full`, and `blockwise N` for
  each of `--block_sizes`) against the kernels (pka_jax/kernels/loss.py) in each of
  `--tilings`. Also each variant's model FLOPs' rate (three `rows × items × d` products,
  whatever the variant recomputes) and MFU against the dense-matmul peak measured in the same
  run. Shape: `--rows --items --width`.

For each variant it prints the time (the first call with its compilation, the median of
`--steps` single calls, and `--steps` calls back to back) and its largest difference from the
reference (the first variant, XLA's: `plain`, `xla` or `chunked`) in the value and in each
gradient, relative to that gradient's largest entry: on a GPU this is the check that the
Triton kernels compute what XLA does, masks included. A variant that fails (a tiling Triton
cannot build) is reported, its error in the JSON, and the others still run. Off a GPU the
kernels run in Pallas's interpreter, only with `--interpret` and at small shapes. A shape the
kernels cannot take, or a flag of another `--kernel`, is refused in one line before any work.
"""

from collections.abc import Callable
import dataclasses
import json
import statistics
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pka_jax import files
from pka_jax.kernels import attention as pallas_attention
from pka_jax.kernels import ffn as pallas_ffn
from pka_jax.kernels import layer_norm as pallas_layer_norm
from pka_jax.kernels import loss as pallas_loss
from pka_jax.model import attention
from pka_jax.model import encoder
from pka_jax.model import flops
from pka_jax.training import losses

_KERNEL = flags.DEFINE_enum('kernel', None, ['attention', 'layer_norm', 'ffn', 'loss'],
                            'The part of the step to time against its Pallas kernels.',
                            required=True)
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16'],
                           "Activations (the loss's: its hidden states).")
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed calls of each variant.')
_PROBE_SIZE = flags.DEFINE_integer(
    'probe_size', 0, "Side of the square matmuls that time the peak for --kernel=loss's MFU "
    '(0: 2,048 on a CPU, 8,192 on an accelerator); a smaller one probes faster and finds a '
    'lower peak.',
    lower_bound=0)
_INTERPRET = flags.DEFINE_bool('interpret', False, "Off a GPU, run the Pallas kernels in "
                               "Pallas's interpreter (slow: small shapes only).")
_JSON = flags.DEFINE_string('json', None, 'Also write the figures to this JSON file.')
# The shapes: each kernel reads its own (Kernel.shape, Kernel.options).
_BATCH = flags.DEFINE_integer('batch', 256, 'Sequences (attention, ffn).')
_MAXLEN = flags.DEFINE_integer('maxlen', 128, 'Positions a sequence, queries and keys '
                               '(attention, ffn).')
_ROWS = flags.DEFINE_integer('rows', 256 * 128, "Rows, batch × maxlen: LayerNorm's, the "
                             "loss's positions (layer_norm, loss).")
_WIDTH = flags.DEFINE_integer('width', 128, 'Hidden width d (every kernel).')
_HEADS = flags.DEFINE_integer('heads', 1, 'Attention heads (attention).')
_DROPOUT = flags.DEFINE_float('dropout', 0.3, 'Dropout rate on the attention weights '
                              '(attention).')
_BLOCKS = flags.DEFINE_integer('blocks', 3, 'Blocks (ffn).')
_ITEMS = flags.DEFINE_integer('items', 3416, 'Items in the catalog (ffn, loss).')
_TILINGS = flags.DEFINE_list(
    'tilings', ['64x128x4x2', '64x64x4x3', '128x64x8x2', '128x128x8x2', '32x128x4x2'],
    'Pallas tilings as block_rows x block_items x num_warps x num_stages (loss).')
_BLOCK_SIZES = flags.DEFINE_list(
    'block_sizes', [], 'Also the blockwise loss with items in blocks of these sizes '
    '(config.ce_block_size) (loss).')

Build = Callable[[], tuple[Callable, tuple]]  # () -> (jitted function, its arguments)


@dataclasses.dataclass(frozen=True)
class Kernel:
  """A part of the step against its Pallas kernels."""
  shape: tuple[str, ...]  # the flags of its shape, in the report's order (--dtype last)
  # `variants(pallas)`: name -> Build, the reference (XLA's path) first, the kernels' only
  # where `pallas` (they run); a shape they cannot take is refused here, before any work.
  variants: Callable[[bool], dict[str, Build]]
  differences: Callable[[object, object], dict[str, float]]  # (out, reference) -> relative
  options: tuple[str, ...] = ()  # its other flags
  variants_key: str = 'implementations'  # the report's name for the variants
  model_flops: Callable[[], int] | None = None  # a call's, for MFU


def relative(a, b) -> float:
  """The largest difference of `a` from `b`, relative to `b`'s largest entry."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def relative_value(value, reference) -> float:
  return abs(float(value) - float(reference)) / abs(float(reference))


# Attention: one training layer, plain path against the kernel.


def attention_gradients(impl: str) -> tuple[Callable, tuple]:
  """The jitted value-and-gradients function of one training attention layer, and its
  arguments."""
  batch, size, width = _BATCH.value, _MAXLEN.value, _WIDTH.value
  module = attention.CausalSelfAttention(num_heads=_HEADS.value, dropout=_DROPOUT.value,
                                         deterministic=False, impl=impl,
                                         dtype=jnp.dtype(_DTYPE.value))
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (batch, size, width))
  # Histories of every length: some rows start with many padding keys.
  valid = jnp.arange(size)[None, :] >= (jnp.arange(batch) % size)[:, None] // 2
  lower = lambda key: jnp.tril(jax.random.normal(key, (size, size))) * 0.1 + jnp.eye(size)
  tk, fv = lower(keys[1]), lower(keys[2])
  params = module.init({'params': keys[3], 'dropout': keys[4]}, x, x, x, valid,
                       k_kernel_TxT=tk, v_kernel_TxT=fv)
  weights = jnp.cos(jnp.arange(x.size)).reshape(x.shape)

  # Arguments, not constants of the program: XLA would spend seconds folding them.
  def total(params, x, tk, fv, valid, weights, rng):
    out = module.apply(params, x, x, x, valid, k_kernel_TxT=tk, v_kernel_TxT=fv,
                       rngs={'dropout': rng})
    return jnp.sum(out.astype(jnp.float32) * weights)

  return (jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2, 3))),
          (params, x, tk, fv, valid, weights, keys[5]))


def attention_variants(pallas: bool) -> dict[str, Build]:
  if pallas:
    heads, width = _HEADS.value, _WIDTH.value
    if width % heads or not pallas_attention.supports(_MAXLEN.value, _MAXLEN.value,
                                                      width // heads):
      # The layer would run the plain path instead: refused rather than timed twice.
      raise app.UsageError(f'--maxlen={_MAXLEN.value} --width={width} --heads={heads}: the '
                           'kernel takes windows and heads of a power of two of at least 16')
  return {'plain': lambda: attention_gradients('plain'),
          **({'pallas': lambda: attention_gradients('pallas')} if pallas else {})}


def attention_differences(out, reference) -> dict[str, float]:
  """The value's relative difference, and the largest of the gradients' differences, each
  relative to its gradient's largest entry (the key bias, whose true gradient is zero and
  which holds rounding noise only, left out)."""
  (value, grads), (ref_value, ref_grads) = out, reference
  worst = 0.0
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref_grads)[0],
                          jax.tree.leaves(grads)):
    if "['key']['bias']" not in jax.tree_util.keystr(path):
      worst = max(worst, relative(b, a))
  return {'value': relative_value(value, ref_value), 'gradients': worst}


# LayerNorm: a step's rows, flax's against the kernels.


def layer_norm_gradients(impl: str) -> tuple[Callable, tuple]:
  """The jitted value-and-gradients function, and its arguments: rows of several offsets
  and spreads, a scale and a bias away from their starting values."""
  keys = jax.random.split(jax.random.key(0), 3)
  rows, width = _ROWS.value, _WIDTH.value
  x = (jax.random.normal(keys[0], (rows, width)) * jnp.linspace(0.5, 2, rows)[:, None]
       + jnp.linspace(-1, 1, rows)[:, None]).astype(jnp.dtype(_DTYPE.value))
  scale = 1 + 0.2 * jax.random.normal(keys[1], (width,))
  bias = 0.2 * jax.random.normal(keys[2], (width,))
  weights = jnp.cos(jnp.arange(rows * width)).reshape(rows, width)
  if impl == 'xla':
    layer_norm = lambda x, scale, bias: nn.LayerNorm(
        epsilon=encoder.LN_EPSILON, dtype=x.dtype).apply(
            {'params': {'scale': scale, 'bias': bias}}, x)
  else:
    options = pallas_layer_norm.Options(encoder.LN_EPSILON,
                                        pallas_layer_norm.block_rows_for(rows),
                                        interpret=jax.default_backend() != 'gpu')
    layer_norm = lambda x, scale, bias: pallas_layer_norm.layer_norm(x, scale, bias, options)

  def total(x, scale, bias, weights):
    return jnp.sum(layer_norm(x, scale, bias).astype(jnp.float32) * weights)

  return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2))), (x, scale, bias, weights)


def layer_norm_variants(pallas: bool) -> dict[str, Build]:
  if pallas and not pallas_layer_norm.supports(_ROWS.value, _WIDTH.value):
    raise app.UsageError(f'--rows={_ROWS.value} --width={_WIDTH.value}: the kernels take rows '
                         'in blocks of 16 to 64 and a width of a power of two of at least 16')
  return {'xla': lambda: layer_norm_gradients('xla'),
          **({'pallas': lambda: layer_norm_gradients('pallas')} if pallas else {})}


def layer_norm_differences(out, reference) -> dict[str, float]:
  """The value's relative difference, and each gradient's largest difference relative to
  its largest entry."""
  (value, grads), (ref_value, ref_grads) = out, reference
  return {'value': relative_value(value, ref_value),
          **{name: relative(b, a) for name, a, b in zip(('rows', 'scale', 'bias'), ref_grads,
                                                        grads)}}


# The blocks' second halves: the encoder's training pass, XLA's against the kernels.


def ffn_model_config(impl: str) -> encoder.ModelConfig:
  """ML-1M's tuned PKA model at the flags' shape."""
  return encoder.ModelConfig(
      num_items=_ITEMS.value, maxlen=_MAXLEN.value, num_blocks=_BLOCKS.value,
      hidden_units=_WIDTH.value, num_heads=1, dropout=0.2, position_mode='kernel',
      dtype=_DTYPE.value, ffn_impl=impl)


def ffn_inputs() -> jax.Array:
  """Sequences of every length from 1 to maxlen, left-padded with 0."""
  batch, maxlen = _BATCH.value, _MAXLEN.value
  lengths = 1 + jnp.arange(batch)[:, None] % maxlen
  position = jnp.arange(maxlen)[None, :]
  items = 1 + (position * 7919 + jnp.arange(batch)[:, None] * 104729) % _ITEMS.value
  return jnp.where(position >= maxlen - lengths, items, 0)


def ffn_gradients(impl: str) -> tuple[Callable, tuple]:
  """The jitted outputs-and-gradients function of the encoder with `ffn_impl=impl`, and its
  arguments: the same parameters (initialised by the XLA encoder) and inputs for both."""
  model = encoder.Encoder(ffn_model_config(impl))
  inputs_BxT = ffn_inputs()
  params = {'params': encoder.Encoder(ffn_model_config('xla')).init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, inputs_BxT)['params']}
  weights = jnp.cos(jnp.arange(inputs_BxT.size * _WIDTH.value)).reshape(
      *inputs_BxT.shape, _WIDTH.value)

  def total(params, inputs_BxT, weights):
    out = model.apply(params, inputs_BxT, rngs={'dropout': jax.random.key(2)})
    return jnp.sum(out.astype(jnp.float32) * weights), out

  return jax.jit(jax.value_and_grad(total, has_aux=True)), (params, inputs_BxT, weights)


def ffn_variants(pallas: bool) -> dict[str, Build]:
  if pallas and not pallas_ffn.supports(_BATCH.value * _MAXLEN.value, _WIDTH.value):
    raise app.UsageError(f'--batch={_BATCH.value} --maxlen={_MAXLEN.value} --width='
                         f'{_WIDTH.value}: the kernels take rows in blocks of 16 or 32 and a '
                         'width of a power of two from 16 to 128')
  return {'xla': lambda: ffn_gradients('xla'),
          **({'pallas': lambda: ffn_gradients('pallas')} if pallas else {})}


def ffn_differences(out, reference) -> dict[str, float]:
  """The outputs' and the gradients' largest differences, each relative to its leaf's largest
  entry (the worst leaf of the gradients)."""
  ((_, outputs), grads), ((_, ref_outputs), ref_grads) = out, reference
  return {'outputs': relative(outputs, ref_outputs),
          'gradients': max(jax.tree.leaves(jax.tree.map(relative, grads, ref_grads)))}


# The loss: XLA's plans against the kernels in several tilings.


def parse_tiling(text: str) -> pallas_loss.Tiling:
  try:
    rows, items, warps, stages = (int(part) for part in text.split('x'))
    return pallas_loss.Tiling(block_rows=rows, block_items=items, num_warps=warps,
                              num_stages=stages)
  except ValueError as error:
    raise app.UsageError(f'--tilings: {text!r} is not rows x items x warps x stages with '
                         f'tiles of powers of two, e.g. 64x128x4x2 ({error})') from None


def loss_gradients(loss) -> tuple[Callable, tuple]:
  """The jitted value-and-gradients function of `loss` `(hidden, table, targets) -> (sum,
  count)` with respect to the hidden states and the table, and its arguments."""
  rows, items, width = _ROWS.value, _ITEMS.value, _WIDTH.value
  keys = jax.random.split(jax.random.key(0), 3)
  hidden = (jax.random.normal(keys[0], (rows, width)) / np.sqrt(width)).astype(
      jnp.dtype(_DTYPE.value))
  table = jax.random.normal(keys[1], (items + 1, width)) * 0.5
  targets = jax.random.randint(keys[2], (rows,), 1, items + 1)
  return (jax.jit(jax.value_and_grad(lambda h, e: loss(h, e, targets)[0], argnums=(0, 1))),
          (hidden, table))


def loss_variants(pallas: bool) -> dict[str, Build]:
  tilings = {text: parse_tiling(text) for text in _TILINGS.value}  # refused here, if at all
  found = {'chunked': losses.chunked_cross_entropy, 'full': losses.full_cross_entropy}
  for size in _BLOCK_SIZES.value:
    found[f'blockwise {size}'] = (
        lambda h, e, t, size=int(size): losses.blockwise_cross_entropy(h, e, t, size))
  # None: Triton on a GPU (the kernels run off one only interpreted).
  interpret = None if jax.default_backend() == 'gpu' else True
  if pallas:
    for text, tiling in tilings.items():
      found[f'pallas {text}'] = (
          lambda h, e, t, tiling=tiling: pallas_loss.pallas_cross_entropy(
              h, e, t, tiling, interpret=interpret))
  return {name: lambda loss=loss: loss_gradients(loss) for name, loss in found.items()}


def loss_differences(out, reference) -> dict[str, float]:
  """The loss's relative difference, and each gradient's largest one relative to its scale."""
  (value, grads), (ref_value, ref_grads) = out, reference
  return {'loss': relative_value(value, ref_value),
          'grad_hidden': relative(grads[0], ref_grads[0]),
          'grad_table': relative(grads[1], ref_grads[1])}


KERNELS = {
    'attention': Kernel(('batch', 'maxlen', 'width', 'heads', 'dropout'), attention_variants,
                        attention_differences),
    'layer_norm': Kernel(('rows', 'width'), layer_norm_variants, layer_norm_differences),
    'ffn': Kernel(('batch', 'maxlen', 'width', 'blocks', 'items'), ffn_variants,
                  ffn_differences),
    'loss': Kernel(('rows', 'items', 'width'), loss_variants, loss_differences,
                   options=('tilings', 'block_sizes'), variants_key='variants',
                   model_flops=lambda: 3 * 2 * _ROWS.value * _ITEMS.value * _WIDTH.value),
}


def refuse_other_kernels_flags(name: str, kernel: Kernel) -> None:
  """A shape flag given that `--kernel=name` does not read: a mistake, refused."""
  own = kernel.shape + kernel.options
  for other in KERNELS.values():
    for flag in other.shape + other.options:
      if flag not in own and FLAGS[flag].present:
        raise app.UsageError(f'--{flag}: not a flag of --kernel={name}, which reads '
                             + ' '.join(f'--{f}' for f in own))


def timed(fn, args, steps: int) -> tuple[dict, object]:
  """Seconds of `fn(*args)`: the first call (compile), the median of `steps` single calls, and
  `steps` calls back to back; and the first call's output."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  compile_seconds = time.perf_counter() - start
  single = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    single.append(time.perf_counter() - start)
  start = time.perf_counter()
  for _ in range(steps):
    result = fn(*args)
  jax.block_until_ready(result)
  return {'compile_seconds': compile_seconds, 'seconds': statistics.median(single),
          'back_to_back_seconds': (time.perf_counter() - start) / steps}, out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  kernel = KERNELS[_KERNEL.value]
  refuse_other_kernels_flags(_KERNEL.value, kernel)
  pallas = jax.default_backend() == 'gpu' or _INTERPRET.value
  variants = kernel.variants(pallas)  # a shape the kernels cannot take stops here
  device = jax.devices()[0]
  report = {'device': f'{device.platform} {device.device_kind}', 'jax': jax.__version__,
            'shape': {**{name: FLAGS[name].value for name in kernel.shape},
                      'dtype': _DTYPE.value}}
  print(f"device  {report['device']} (jax {jax.__version__}); {report['shape']}")
  if kernel.model_flops:
    report['peak_flops'] = peak = flops.MatmulProbe(jnp.dtype(_DTYPE.value), _PROBE_SIZE.value)()
    report['model_flops'] = model_flops = kernel.model_flops()
    print(f'peak    {_DTYPE.value} matmul {peak / 1e12:.3f} TFLOP/s; '
          f'{model_flops / 1e9:,.1f} GFLOP of model work a call (forward and backward)')
  if not pallas:
    print('pallas  skipped: Triton kernels need a GPU (--interpret runs them interpreted)')
  report[kernel.variants_key] = found = {}
  width = max(map(len, variants))
  reference = reference_name = None
  for name, build in variants.items():
    try:
      figures, out = timed(*build(), _STEPS.value)
    except Exception as error:  # noqa: BLE001 (a tiling Triton cannot build: say so, go on)
      print(f'{name:{width}s} failed: {type(error).__name__}: {str(error)[:300]}')
      found[name] = {'error': f'{type(error).__name__}: {str(error)[:2000]}'}
      continue
    if reference is None:
      reference, reference_name = out, name
    if kernel.model_flops:
      figures['mfu'] = model_flops / figures['back_to_back_seconds'] / peak
    figures['difference'] = kernel.differences(out, reference)
    found[name] = figures
    compared = ', '.join(f'{what} {value:.1e}' for what, value in figures['difference'].items())
    mfu = f", MFU {figures['mfu']:6.1%}" if 'mfu' in figures else ''
    print(f"{name:{width}s} {figures['seconds'] * 1e3:9.3f} ms alone, "
          f"{figures['back_to_back_seconds'] * 1e3:9.3f} ms back to back{mfu}; compile "
          f"{figures['compile_seconds']:5.1f} s; vs {reference_name}: {compared}")
  if _JSON.value:
    files.write_text(_JSON.value, json.dumps(report, indent=2))


FLAGS = flags.FLAGS

if __name__ == '__main__':
  app.run(main)
