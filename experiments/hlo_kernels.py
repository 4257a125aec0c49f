"""The kernels an optimised GPU HLO module launches, read from its text.

XLA's GPU compiler turns each fusion, library call (cuBLAS, cuDNN), Triton call (a Pallas
kernel) and copy of the entry computation into one kernel launch; views, tuples, parameters
and constants launch nothing. A loop's body launches once per trip, and a CUDA graph may run
independent kernels side by side, but never two that feed one another: the longest chain of
kernels, each consuming the one before, bounds the step's time from below whatever the
concurrency. `python -m experiments.kernels.gpu_kernels` counts them in a program compiled
without a GPU; `python -m experiments.speed.trace_breakdown` times the chain of a profiled one.
Both place each kernel in the model by its `op_name` (`part_of`).

Each kernel also carries the bytes one launch reads and writes: its results and each of its
operands once, whole. A kernel that reads only a slice of an operand is over-counted, one
whose operands stay in the L2 cache moves less through memory, so the total over the
bandwidth estimates the step's memory time rather than bounding it.
"""

import collections
import dataclasses
import math
import re

TRITON_CALL = re.compile(r'custom_call_target="__gpu\$xla\.gpu\.triton".*?\bname = \\?"(\w+)')
# Instructions that launch nothing: views, tuples, parameters and constants.
_NO_KERNEL = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'after-all',
              'partition-id', 'replica-id', 'opt-barrier', 'add-dependency', 'domain'}
_COMPUTATION = re.compile(r'^(ENTRY )?%?([\w.\-]+) .*\{$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([\d,]*)\]')
_ITEM_BITS = {'pred': 8, 'token': 0}
_JAX_SCOPE = re.compile(r'while|body|cond|closed_call|checkpoint|remat|branch_\d+_fun')


@dataclasses.dataclass(frozen=True)
class Kernel:
  name: str  # the HLO instruction
  kind: str  # 'fusion', 'gemm' (a matrix product), 'triton' (a Pallas kernel), 'copy', ...
  op_name: str  # where in the JAX program it comes from
  launches: int = 1  # a step's: more inside a loop
  bytes: int = 0  # one launch's operands and results, each once


@dataclasses.dataclass
class Census:
  kernels: list[Kernel]
  longest_chain: list[Kernel]  # one after another, each on the last one's output

  @property
  def launches(self) -> int:
    return sum(k.launches for k in self.kernels)

  @property
  def bytes(self) -> int:
    return sum(k.bytes * k.launches for k in self.kernels)

  def by(self, key, weight=lambda kernel: kernel.launches) -> collections.Counter:
    counts = collections.Counter()
    for kernel in self.kernels:
      counts[key(kernel)] += weight(kernel)
    return counts


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape's arrays: `f32[4,8]{1,0}` 128, a tuple its elements' sum."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    # The element type's first number is its width: bf16, s4, f8e4m3fn, c64.
    bits = _ITEM_BITS[dtype] if dtype in _ITEM_BITS else int(re.search(r'\d+', dtype).group())
    total += math.prod(int(d) for d in dims.split(',') if d) * bits // 8
  return total


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """Each computation's instruction lines, and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    if (found := _COMPUTATION.match(line)) and not line.startswith(' '):
      current = found.group(2)
      computations[current] = []
      entry = current if found.group(1) else entry
    elif line.startswith('}'):
      current = None
    elif current and line.strip():
      computations[current].append(line)
  return computations, entry


def _kind(opcode: str, line: str) -> str:
  if opcode == 'custom-call':
    target = re.search(r'custom_call_target="([^"]+)"', line).group(1)
    return ('triton' if 'triton' in target else 'gemm' if 'cublas' in target
            else 'cudnn' if 'cudnn' in target else f'library {target}')
  if opcode == 'fusion' and re.search(r'"kind":"__(triton\w*gemm|cublas)', line):
    return 'gemm'
  return 'fusion' if opcode == 'fusion' else opcode


def census(hlo_text: str) -> Census:
  """The kernels an optimised GPU HLO module launches: the entry computation's, with each
  loop body's repeated its known trip count, a conditional's branches counted once each
  (only one runs), and calls inlined; and the longest chain of kernels, each consuming the
  one before (a loop's counts its body's chain once per trip)."""
  computations, entry = _computations(hlo_text)

  def walk(computation: str, repeats: int) -> tuple[list[Kernel], list[Kernel]]:
    kernels, chain = [], {}  # chain: each instruction's longest chain of kernels, ending it
    sizes = {}  # each instruction's result bytes
    for line in computations[computation]:
      found = _INSTRUCTION.match(line)
      if not found:
        continue
      name, shape, opcode, rest = found.groups()
      sizes[name] = shape_bytes(shape)
      operands = dict.fromkeys(re.findall(r'%([\w.\-]+)', rest.split(')', 1)[0]))  # in order, once
      before = max((chain.get(o, []) for o in operands), key=_chain_length, default=[])
      if opcode in _NO_KERNEL or opcode.endswith('-done'):
        chain[name] = before
        continue
      called = []
      if opcode == 'while':
        trips = int(m.group(1)) if (m := _TRIP_COUNT.search(line)) else 1
        called = [(re.search(r'body=%?([\w.\-]+)', line).group(1), trips)]
      elif opcode == 'call':
        called = [(re.search(r'to_apply=%?([\w.\-]+)', line).group(1), 1)]
      elif opcode == 'conditional':
        listed = re.search(r'branch_computations=\{([^}]*)\}', line)
        branches = (listed.group(1).split(',') if listed else
                    re.findall(r'(?:true|false)_computation=(%?[\w.\-]+)', line))
        called = [(b.strip().lstrip('%'), 1) for b in branches]
      if called:
        inner = [walk(body, repeats * trips) + (trips,) for body, trips in called]
        kernels += [k for body_kernels, _, _ in inner for k in body_kernels]
        longest = max(inner, key=lambda found: _chain_length(found[1]) * found[2])
        chain[name] = before + longest[1] * longest[2]
        continue
      op_name = m.group(1) if (m := re.search(r'op_name="([^"]*)"', line)) else ''
      kind = _kind(opcode, line)
      triton = TRITON_CALL.search(line) if kind == 'triton' else None
      # A Pallas kernel goes by its own name, its PTX's entry.
      moved = sizes[name] + sum(sizes.get(o, 0) for o in operands)
      kernels.append(Kernel(triton.group(1) if triton else name, kind, op_name, repeats, moved))
      chain[name] = before + [kernels[-1]]
    return kernels, max(chain.values(), key=_chain_length, default=[])

  kernels, longest_chain = walk(entry, 1)
  return Census(kernels, longest_chain)


def _chain_length(chain: list[Kernel]) -> int:
  return len(chain)


def part_of(op_name: str) -> tuple[str, str]:
  """`(part, pass)` of an op from its `op_name` (the first, where XLA joined several
  with `;`)."""
  op_name = op_name.split(';')[0]
  scopes = op_name.split('/')[1:]  # after `jit(train_step)`
  direction = ('backward' if 'transpose(' in op_name
               else 'forward' if 'jvp(' in op_name else '')
  for i, scope in enumerate(scopes):
    if 'Encoder' in scope:
      # Flax module names up to the primitive (`mul`, `dot_general`) that ends the path,
      # without JAX's own scopes (`while/body`, `cond/branch_1_fun`, `jit(_where)`).
      modules = [re.sub(r'_\d+$', '', s) for s in scopes[i + 1:-1]
                 if re.fullmatch(r'\w+', s) and not _JAX_SCOPE.fullmatch(s)]
      return 'encoder/' + '/'.join(modules[:3] or ['(its own ops)']), direction
  if direction:
    return 'loss', direction
  if not op_name:
    return '(no op_name)', ''
  # Outside the gradient: the sum over microbatches inside the step's loop, else the update.
  return ('gradient sum over microbatches' if '/while/' in op_name
          else 'optimizer and update'), ''
