"""The full-catalog cross-entropy alone, forward and backward: XLA's plans against the Pallas
kernels (pka_jax/kernels/loss.py) in several tilings, on the default device.

  python experiments/loss_benchmark.py                       # ML-1M's PKA shape, bfloat16
  python experiments/loss_benchmark.py --dtype=float32 --json=/tmp/loss.json
  python experiments/loss_benchmark.py --tilings=64x128x4x2,128x64x8x3
  python experiments/loss_benchmark.py --dtype=float32 --rows=4096 --items=64367 \
      --block_sizes=16384  # Yelp's shape: the blockwise loss (config.ce_block_size)

Each variant is the jitted value and gradients (hidden states and item table) of one batch's
loss sum. For each it prints the time (median of single calls, and back to back), its model
FLOPs' rate (three `rows × items × d` products, whatever the variant recomputes) and MFU
against the dense-matmul peak measured in the same run, and its largest difference from the
reference (`chunked`, the default XLA loss) in the loss and in each gradient, relative to that
gradient's largest entry: on a GPU this is the check that the Triton kernels compute the same
loss. Off a GPU the Pallas variants run in Pallas's interpreter, only with `--interpret` and
at small shapes.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import kernel_timing
from pka_jax.kernels import loss as pallas_loss
from pka_jax.model import flops
from pka_jax.training import losses

_ROWS = flags.DEFINE_integer('rows', 256 * 128, 'Positions in the batch (batch × maxlen).')
_ITEMS = flags.DEFINE_integer('items', 3416, 'Items in the catalog.')
_WIDTH = flags.DEFINE_integer('width', 128, 'Hidden width d.')
_TILINGS = flags.DEFINE_list(
    'tilings', ['64x128x4x2', '64x64x4x3', '128x64x8x2', '128x128x8x2', '32x128x4x2'],
    'Pallas tilings as block_rows x block_items x num_warps x num_stages.')
_BLOCK_SIZES = flags.DEFINE_list(
    'block_sizes', [], 'Also the blockwise loss with items in blocks of these sizes '
    '(config.ce_block_size).')
_FLAGS = kernel_timing.define_flags('Hidden states.', timed='variant')


def parse_tiling(text: str) -> pallas_loss.Tiling:
  try:
    rows, items, warps, stages = (int(part) for part in text.split('x'))
    return pallas_loss.Tiling(block_rows=rows, block_items=items, num_warps=warps,
                              num_stages=stages)
  except ValueError as error:
    raise app.UsageError(f'--tilings: {text!r} is not rows x items x warps x stages with '
                         f'tiles of powers of two, e.g. 64x128x4x2 ({error})') from None


def variants(interpret: bool | None) -> dict:
  """Name → loss function `(hidden, table, targets) -> (sum, count)`."""
  found = {'chunked': losses.chunked_cross_entropy, 'full': losses.full_cross_entropy}
  for size in _BLOCK_SIZES.value:
    found[f'blockwise {size}'] = (
        lambda h, e, t, size=int(size): losses.blockwise_cross_entropy(h, e, t, size))
  tilings = {text: parse_tiling(text) for text in _TILINGS.value}
  if interpret is not False:
    for text, tiling in tilings.items():
      found[f'pallas {text}'] = (
          lambda h, e, t, tiling=tiling: pallas_loss.pallas_cross_entropy(
              h, e, t, tiling, interpret=interpret))
  return found


def inputs(rows: int, items: int, width: int, dtype):
  keys = jax.random.split(jax.random.key(0), 3)
  hidden = (jax.random.normal(keys[0], (rows, width)) / np.sqrt(width)).astype(dtype)
  table = jax.random.normal(keys[1], (items + 1, width)) * 0.5
  targets = jax.random.randint(keys[2], (rows,), 1, items + 1)
  return hidden, table, targets


def differences(out, reference) -> dict:
  """The loss's relative difference, and each gradient's largest one relative to its scale."""
  (value, grads), (ref_value, ref_grads) = out, reference
  relative = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                                / jnp.max(jnp.abs(b.astype(jnp.float32))))
  return {'loss': abs(float(value) - float(ref_value)) / abs(float(ref_value)),
          'grad_hidden': relative(grads[0], ref_grads[0]),
          'grad_table': relative(grads[1], ref_grads[1])}


def main(argv):
  del argv
  on_gpu = jax.default_backend() == 'gpu'
  interpret = None if on_gpu else _FLAGS.interpret.value
  functions = variants(interpret)  # bad tilings stop here, before any work
  dtype = jnp.dtype(_FLAGS.dtype.value)
  rows, items, width = _ROWS.value, _ITEMS.value, _WIDTH.value
  hidden, table, targets = inputs(rows, items, width, dtype)
  peak = flops.MatmulProbe(dtype)()
  model_flops = 3 * 2 * rows * items * width
  device = jax.devices()[0]
  report = {'device': f'{device.platform} {device.device_kind}', 'jax': jax.__version__,
            'shape': {'rows': rows, 'items': items, 'width': width, 'dtype': _FLAGS.dtype.value},
            'peak_flops': peak, 'model_flops': model_flops, 'variants': {}}
  print(f"device  {report['device']} (jax {jax.__version__}); {_FLAGS.dtype.value} matmul peak "
        f'{peak / 1e12:.3f} TFLOP/s')
  print(f'loss    {rows:,} rows x {items:,} items x d {width}: '
        f'{model_flops / 1e9:,.1f} GFLOP of model work (forward and backward)')
  if interpret is False:
    print('pallas  skipped: Triton kernels need a GPU (--interpret runs them interpreted)')
  reference = None
  for name, loss in functions.items():
    fn = jax.jit(jax.value_and_grad(lambda h, e, loss=loss: loss(h, e, targets)[0],
                                    argnums=(0, 1)))
    try:
      figures, out = kernel_timing.timed(fn, (hidden, table), _FLAGS.steps.value)
    except Exception as error:  # noqa: BLE001 (a tiling Triton cannot build: say so, go on)
      print(f'{name:22s} failed: {type(error).__name__}: {str(error)[:300]}')
      report['variants'][name] = {'error': f'{type(error).__name__}: {str(error)[:2000]}'}
      continue
    reference = reference or out
    figures['mfu'] = model_flops / figures['back_to_back_seconds'] / peak
    figures['difference'] = differences(out, reference)
    report['variants'][name] = figures
    d = figures['difference']
    print(f"{name:22s} {figures['seconds'] * 1e3:9.3f} ms alone, "
          f"{figures['back_to_back_seconds'] * 1e3:9.3f} ms back to back, "
          f"MFU {figures['mfu']:6.1%}; compile {figures['compile_seconds']:5.1f} s; "
          f"vs chunked: loss {d['loss']:.1e}, grads {d['grad_hidden']:.1e} / "
          f"{d['grad_table']:.1e}")
  if _FLAGS.json.value:
    kernel_timing.write_json(report, _FLAGS.json.value)


if __name__ == '__main__':
  app.run(main)
