"""experiments.hlo_kernels and experiments.kernels.gpu_kernels: the kernels an optimised GPU
program launches, and their longest chain, counted from its HLO text; a train step compiled
for a GPU without one."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from experiments import hlo_kernels
from experiments.kernels import gpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FWD = 'metadata={op_name="jit(train_step)/jvp(Encoder)/block_0/ln_attn/reduce_sum"}'
_BWD = 'metadata={op_name="jit(train_step)/transpose(jvp(Encoder))/block_1/ffn_in/dot_general"}'
_OPT = 'metadata={op_name="jit(train_step)/cond"}'

# Two kernels side by side (a, b), a Triton GEMM on both, a loop of 5 trips whose body runs
# two kernels in a row, a conditional whose branches run one and two, a kernel on the side,
# a Pallas kernel on the branch's output and the side's, a cuBLAS call, a copy, and views
# that launch nothing.
HLO = f'''HloModule jit_train_step, is_scheduled=true

%fused_a (p0: f32[4]) -> f32[4] {{
  %p0 = f32[4]{{0}} parameter(0)
  ROOT %n = f32[4]{{0}} negate(%p0)
}}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {{
  %t = (s32[], f32[4]{{0}}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[4]{{0}} get-tuple-element(%t), index=1
  %loop_fusion.1 = f32[4]{{0}} fusion(%x), kind=kLoop, calls=%fused_a, {_FWD}
  %loop_fusion.2 = f32[4]{{0}} fusion(%loop_fusion.1), kind=kLoop, calls=%fused_a, {_FWD}
  ROOT %out = (s32[], f32[4]{{0}}) tuple(%i, %loop_fusion.2)
}}

%condition (t: (s32[], f32[4])) -> pred[] {{
  %t = (s32[], f32[4]{{0}}) parameter(0)
  ROOT %c = pred[] constant(true)
}}

%one (x: f32[4]) -> f32[4] {{
  %x = f32[4]{{0}} parameter(0)
  ROOT %loop_fusion.3 = f32[4]{{0}} fusion(%x), kind=kLoop, calls=%fused_a, {_OPT}
}}

%two (x: f32[4]) -> f32[4] {{
  %x = f32[4]{{0}} parameter(0)
  %loop_fusion.4 = f32[4]{{0}} fusion(%x), kind=kLoop, calls=%fused_a, {_OPT}
  ROOT %loop_fusion.5 = f32[4]{{0}} fusion(%loop_fusion.4), kind=kLoop, calls=%fused_a, {_OPT}
}}

ENTRY %main.1 (p: f32[4], q: pred[]) -> f32[4] {{
  %p = f32[4]{{0}} parameter(0)
  %q = pred[] parameter(1)
  %a = f32[4]{{0}} fusion(%p), kind=kLoop, calls=%fused_a, {_FWD}
  %b = f32[4]{{0}} fusion(%p), kind=kInput, calls=%fused_a, {_FWD}
  %gemm = f32[4]{{0}} fusion(%a, %b), kind=kCustom, calls=%fused_a, backend_config={{"fusion_backend_config":{{"kind":"__triton_nested_gemm_fusion"}}}}, {_BWD}
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]{{0}}) tuple(%zero, %gemm)
  %loop = (s32[], f32[4]{{0}}) while(%init), condition=%condition, body=%body, backend_config={{"known_trip_count":{{"n":"5"}}}}
  %looped = f32[4]{{0}} get-tuple-element(%loop), index=1
  %branch = f32[4]{{0}} conditional(%q, %looped, %looped), true_computation=%one, false_computation=%two
  %side = f32[4]{{0}} fusion(%p), kind=kLoop, calls=%fused_a, {_BWD}
  %pallas = f32[4]{{0}} custom-call(%branch, %side), custom_call_target="__gpu$xla.gpu.triton", {_BWD}, backend_config={{name = \\"attention_kernel\\"}}
  %cublas = (f32[4]{{0}}, s8[8]{{0}}) custom-call(%pallas), custom_call_target="__cublas$gemm", {_BWD}
  %product = f32[4]{{0}} get-tuple-element(%cublas), index=0
  ROOT %copy = f32[4]{{0}} copy(%product)
}}
'''


def test_every_launch_is_counted_loops_by_their_trips():
  result = hlo_kernels.census(HLO)
  # a, b, the GEMM, 5 x 2 in the loop, 1 + 2 in the branches, the side, Pallas, cuBLAS,
  # the copy.
  assert result.launches == 3 + 10 + 3 + 4
  assert result.by(lambda k: k.kind) == {'fusion': 16, 'gemm': 2, 'triton': 1, 'copy': 1}
  assert [k.name for k in result.kernels if k.kind == 'triton'] == ['attention_kernel']
  assert [k.launches for k in result.kernels if k.name.startswith('loop_fusion.1')] == [5]


def test_the_longest_chain_follows_the_data_and_takes_the_longer_branch():
  result = hlo_kernels.census(HLO)
  # a (or b), the GEMM, 2 kernels x 5 trips, the two-kernel branch, Pallas, cuBLAS, the
  # copy; the side kernel reads only `p`, off the chain.
  names = [k.name for k in result.longest_chain]
  assert len(names) == 1 + 1 + 10 + 2 + 1 + 1 + 1
  assert names[1] == 'gemm' and names[-3:] == ['attention_kernel', 'cublas', 'copy']
  assert names[2:12] == ['loop_fusion.1', 'loop_fusion.2'] * 5
  assert names[12:14] == ['loop_fusion.4', 'loop_fusion.5'] and 'side' not in names


def test_each_launch_moves_its_operands_and_results_once():
  result = hlo_kernels.census(HLO)
  moved = {k.name: k.bytes for k in result.kernels}
  vector = 4 * 4  # every array here is an f32[4]
  assert moved['a'] == moved['side'] == moved['loop_fusion.1'] == 2 * vector
  assert moved['gemm'] == moved['attention_kernel'] == 3 * vector  # two operands, a result
  assert moved['cublas'] == 2 * vector + 8  # and its s8[8] workspace, a tuple's element
  # a, b, the GEMM, 5 x 2 loop kernels, 3 in the branches, the side, Pallas, cuBLAS, the copy
  assert result.bytes == (32 + 32 + 48) + 5 * (32 + 32) + 3 * 32 + 32 + 48 + 40 + 32
  by_part = result.by(gpu_kernels.part, lambda k: k.bytes * k.launches)
  assert by_part['encoder/block/ln_attn (forward)'] == 32 + 32 + 5 * (32 + 32)
  assert sum(by_part.values()) == result.bytes


def test_a_shape_s_bytes_follow_its_element_widths():
  assert hlo_kernels.shape_bytes('f32[4,8]{1,0}') == 128
  assert hlo_kernels.shape_bytes('(bf16[3]{0}, pred[5]{0}, s32[], token[])') == 6 + 5 + 4
  assert hlo_kernels.shape_bytes('(f8e4m3fn[16]{0}, s4[8]{0}, c64[2]{0})') == 16 + 4 + 16


def test_kernels_go_to_the_part_of_the_model_they_come_from():
  by_part = hlo_kernels.census(HLO).by(gpu_kernels.part)
  assert by_part == {'encoder/block/ln_attn (forward)': 2 + 10,
                     'encoder/block/ffn_in (backward)': 4,
                     'optimizer and update': 3,
                     '(no op_name)': 1}


def has_cuda_plugin() -> bool:
  try:
    return importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
  except ModuleNotFoundError:  # no jax_plugins at all
    return False


@pytest.mark.skipif(not has_cuda_plugin(), reason="jax's CUDA plugin is not installed")
def test_the_train_step_compiles_for_a_gpu_without_one(tmp_path):
  out = tmp_path / 'kernels.json'
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.kernels.gpu_kernels', '--config=configs/test.py',
       '--config.attention_impl=pallas', '--config.hidden_units=32', '--num_items=60',
       f'--json={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(out.read_text())
  blocks = 2  # configs/test.py's; width 32 gives heads of 16, the kernel's least
  # Pallas attention forward and backward in every block, compiled by Triton for the GPU.
  assert len(figures['triton']) == 2 * blocks
  assert figures['by_kind']['gemm'] >= 6 * blocks
  assert figures['longest_chain'] < figures['kernels']
  # At least the item table's gradient and the step's hidden states pass through memory.
  assert figures['bytes'] == sum(figures['bytes_by_part'].values()) > 60 * 32 * 4
  if gpu_kernels.find_ptxas():  # each Pallas kernel assembled for the GPU: its registers
    assert set(figures['registers']) == set(figures['triton'])
    assert all(0 < usage['registers'] <= 255 for usage in figures['registers'].values())
