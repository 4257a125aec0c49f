"""experiments.speed.trace_breakdown: a profiled step's ops matched to HLO and split by part
(experiments.hlo_kernels.part_of)."""

import pytest

from experiments import hlo_kernels
from experiments.speed import trace_breakdown

# Two GEMMs XLA compiled once (one kernel, launched for each in turn), a cuBLAS call, and
# ops of the forward pass, the loss and the optimizer.
HLO = '''HloModule jit_train_step, is_scheduled=true

ENTRY %main.9 (p: f32[4,8]) -> f32[4,8] {
  %fusion.1 = f32[4,4]{1,0} fusion(%p), kind=kLoop, calls=%c1, metadata={op_name="jit(train_step)/jvp(Encoder)/block_0/attention/reduce_max" scheduling_name="fusion.1"}
  %gemm_fusion.2 = f32[8,8]{1,0} fusion(%p), kind=kCustom, calls=%c2, metadata={op_name="jit(train_step)/transpose(jvp(Encoder))/block_1/ffn_out/dot_general" deduplicated_name="gemm_fusion.2"}
  %custom-call.3 = (f32[4,60]{1,0}, s8[64]{0}) custom-call(%p), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/jvp()/dot_general"}
  %gemm_fusion.7 = f32[8,8]{1,0} fusion(%p), kind=kCustom, calls=%c7, metadata={op_name="jit(train_step)/transpose(jvp(Encoder))/block_0/ffn_in/dot_general" deduplicated_name="gemm_fusion.2"}
  ROOT %fusion.4 = f32[4,8]{1,0} fusion(%p), kind=kLoop, calls=%c4, metadata={op_name="jit(train_step)/cond/branch_1_fun/add"}
}
'''


def gpu_trace(kernels_per_step):
  """Two steps of the kernels `(name, microseconds)`, on GPU 0's stream, and a host event
  of the same module that is not a kernel."""
  events = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
            {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}},
            {'ph': 'X', 'pid': 2, 'tid': 1, 'ts': 0, 'dur': 5000, 'name': 'Thunk::Execute',
             'args': {'hlo_module': 'jit_train_step'}}]
  ts = 0
  for _ in range(2):
    for name, dur in kernels_per_step:
      events.append({'ph': 'X', 'pid': 1, 'tid': 7, 'ts': ts, 'dur': dur, 'name': name,
                     'args': {'hlo_module': 'jit_train_step'}})
      ts += dur + 1
  return {'traceEvents': events}


def parts(expected):
  return {key: pytest.approx(us) for key, us in expected.items()}


def test_gpu_kernels_go_to_the_instructions_they_run_in_turn():
  trace = gpu_trace([('fusion_1', 10), ('gemm_fusion_2', 20), ('Memset 0', 1),
                     ('nvjet_sm90_tss_128x256', 40), ('gemm_fusion_2', 30), ('fusion_4', 5)])
  result = trace_breakdown.breakdown(trace, HLO, steps=2)
  assert result['by_part'] == parts({
      ('encoder/block/attention', 'forward'): 10,
      ('encoder/block/ffn_out', 'backward'): 20,  # the kernel's first launch of a step
      ('encoder/block/ffn_in', 'backward'): 30,  # and its second
      ('loss', 'forward'): 40,  # the cuBLAS call
      (trace_breakdown.COPIES, ''): 1,
      ('optimizer and update', ''): 5})
  assert result['step_us'] == 106 and result['matched'] == 1.0
  assert result['ops_per_step'] == 6


@pytest.mark.parametrize('quote', ['"', '\\"'])  # as jax lowers it, and escaped
def test_pallas_kernels_go_by_their_triton_names_and_cublas_still_pairs(quote):
  # Two launches of one Pallas kernel a step (its name in the Triton call's backend config)
  # and one of another: they neither count as library kernels nor stop cuBLAS's pairing.
  triton = ('custom_call_target="__gpu$xla.gpu.triton", api_version=API_VERSION_TYPED_FFI, '
            f'backend_config={{debug = false, grid_x = 16 : i32, ir = {quote}ML\\EFR{quote}, '
            f'name = {quote}{{kernel}}{quote}, num_stages = 2 : i32}}')
  calls = ''.join(
      f'  %custom-call.{n} = f32[8]{{0}} custom-call(%p), '
      + triton.replace('{kernel}', kernel)
      + f', metadata={{op_name="jit(train_step)/{scope}/pallas_call"}}\n'
      for n, kernel, scope in [(11, 'forward_kernel', 'jvp()'),
                               (12, 'grad_kernel', 'transpose(jvp())'),
                               (13, 'forward_kernel', 'jvp(Encoder)/block_0/ffn_in')])
  hlo = HLO.replace('  ROOT %fusion.4', calls + '  ROOT %fusion.4')
  trace = gpu_trace([('forward_kernel', 7), ('nvjet_a', 40), ('grad_kernel', 9),
                     ('forward_kernel', 3)])
  result = trace_breakdown.breakdown(trace, hlo, steps=2)
  assert result['by_part'] == parts({
      ('loss', 'forward'): 7 + 40, ('loss', 'backward'): 9,
      ('encoder/block/ffn_in', 'forward'): 3})
  assert result['matched'] == 1.0


def test_the_longest_chain_is_timed_launch_by_launch():
  # fusion.1 feeds the first GEMM, which feeds the cuBLAS call; the second launch of the
  # shared GEMM kernel and fusion.4 read only the parameter.
  hlo = (HLO.replace('%gemm_fusion.2 = f32[8,8]{1,0} fusion(%p)',
                     '%gemm_fusion.2 = f32[8,8]{1,0} fusion(%fusion.1)')
         .replace('custom-call(%p)', 'custom-call(%gemm_fusion.2)'))
  trace = gpu_trace([('fusion_1', 10), ('gemm_fusion_2', 20), ('nvjet_sm90_tss', 40),
                     ('gemm_fusion_2', 30), ('fusion_4', 5)])
  result = trace_breakdown.breakdown(trace, hlo, steps=2)
  assert result['chain_ops'] == result['chain_timed_ops'] == 3
  assert result['chain_us'] == pytest.approx(10 + 20 + 40)  # not the GEMM's 30 us launch


def test_library_kernels_that_do_not_pair_with_calls_stay_unmatched():
  # Two cuBLAS kernels a step for one call (say a split-K reduction after the product).
  trace = gpu_trace([('fusion_1', 10), ('nvjet_a', 40), ('splitKreduce_kernel', 10)])
  result = trace_breakdown.breakdown(trace, HLO, steps=2)
  assert result['by_part'][(trace_breakdown.UNMATCHED, '')] == 50
  assert result['matched'] == pytest.approx(10 / 60)


def test_cpu_thunks_count_once_inside_loops_and_on_the_first_device():
  def thunk(name, ts, dur, device='0'):
    return {'ph': 'X', 'pid': 1, 'tid': int(device), 'ts': ts, 'dur': dur, 'name': name,
            'args': {'hlo_module': 'jit_train_step', 'device_ordinal': device}}
  events = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/host:CPU'}},
            thunk('while.5', 0, 100),  # a loop around the two thunks it runs
            thunk('fusion.1', 10, 20), thunk('gemm_fusion.2', 40, 30),
            thunk('fusion.4', 200, 6),
            thunk('fusion.1', 0, 99, device='1')]  # the second device's copy of the step
  result = trace_breakdown.breakdown({'traceEvents': events}, HLO, steps=1)
  assert result['by_part'] == parts({
      ('encoder/block/attention', 'forward'): 20,
      ('encoder/block/ffn_out', 'backward'): 30,
      ('optimizer and update', ''): 6})


@pytest.mark.parametrize('op_name, part', [
    ('jit(train_step)/jvp(Encoder)/block_2/attention/query/dot_general',
     ('encoder/block/attention/query', 'forward')),
    ('jit(train_step)/transpose(jvp(Encoder))/item_emb/jit(_take)/scatter-add',
     ('encoder/item_emb', 'backward')),
    ('jit(train_step)/jvp(Encoder)/mul', ('encoder/(its own ops)', 'forward')),
    ('jit(train_step)/jvp()/reduce_max', ('loss', 'forward')),
    ('jit(train_step)/is_finite', ('optimizer and update', '')),
    # JAX's own scopes are no modules; XLA may join several names with `;`.
    ('jit(s)/while/body/jvp(Encoder)/block_0/attention/while/body/cond/branch_1_fun/mul;'
     'jit(s)/while/body/jvp(Encoder)/block_0/ffn_in/add',
     ('encoder/block/attention', 'forward')),
    ('jit(s)/while/body/add', ('gradient sum over microbatches', '')),
    ('', ('(no op_name)', '')),
])
def test_parts_come_from_the_op_names(op_name, part):
  assert hlo_kernels.part_of(op_name) == part


def test_an_op_xla_made_without_a_name_takes_its_nearest_operands():
  program = trace_breakdown.read_hlo(HLO.replace(
      'ROOT %fusion.4', '%dot.5 = f32[4,4]{1,0} dot(%fusion.1, %p)\n  ROOT %fusion.4'))
  assert program.ops['dot.5'] == [trace_breakdown.Instruction(
      'f32[4,4]{1,0}', 'jit(train_step)/jvp(Encoder)/block_0/attention/reduce_max',
      inferred=True, name='dot.5')]
  assert not program.ops['fusion.1'][0].inferred
