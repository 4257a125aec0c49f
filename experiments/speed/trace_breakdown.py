"""Where a profiled train step's time goes, part by part of the model.

  python -m experiments.speed.benchmark --config=configs/ml1m.py --synthetic_items=3416 \
      --profile_dir=/tmp/trace
  python -m experiments.speed.trace_breakdown /tmp/trace

Reads the newest profiler trace under the directory (`*.trace.json.gz`) and the optimised HLO
of the traced train step that `benchmark.py --profile_dir` writes beside it
(`train_step.hlo.txt`). Each op the step ran on the first device (a GPU kernel, or a CPU
thunk) is matched by name to its HLO instruction, whose `op_name` says where it comes from:
the forward or the backward pass (JAX's `transpose(...)`), the part of the model
(`Encoder/block_1/attention/...`, block numbers dropped: XLA shares one op between blocks),
the loss (under `jvp()` outside the encoder), or outside both the optimizer and the sum of
the microbatches' gradients (hlo_kernels.part_of). A fusion counts where its root op comes
from. Prints the time a step by part, forward and backward, then the costliest ops, and the
time of the longest chain of ops each consuming the one before (hlo_kernels.census).
"""

import collections
import dataclasses
import glob
import gzip
import json
import os
import re

from absl import app
from absl import flags

from experiments import hlo_kernels

HLO_FILE = 'train_step.hlo.txt'
TRACED_STEPS = 3  # benchmark.py's
UNMATCHED = 'kernels matching no instruction'
COPIES = 'copies and memsets'
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (.+?) [\w-]+\(')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_DEDUPLICATED = re.compile(r'deduplicated_name="([^"]*)"')
_LIBRARY_CALL = re.compile(r'custom_call_target="__(cublas|cudnn)')
_COPY = re.compile(r'^(memcpy|memset|Memcpy|Memset)')


@dataclasses.dataclass(frozen=True)
class Instruction:
  shape: str  # of its output
  op_name: str  # where in the JAX program it comes from
  inferred: bool = False  # op_name taken from an operand's: XLA made the op without one
  name: str = ''  # the instruction's own


@dataclasses.dataclass
class Program:
  """An optimised HLO module: for each op name the instructions that op runs, in order, and
  the library calls (cuBLAS, cuDNN) in order."""
  module: str
  ops: dict[str, list[Instruction]]
  library_calls: list[Instruction]


def read_hlo(text: str) -> Program:
  """On GPU, XLA compiles identical fusions once: every instruction of such a group names its
  kernel in `deduplicated_name`, the kernel takes one member's name, and its k-th launch
  within a step is the group's k-th instruction in the schedule (the order of the text).
  Names are also kept with `.` written `_`, as kernels spell them, and a Triton call (a
  Pallas kernel) also goes by the kernel name in its backend config. An instruction XLA made
  without an `op_name` (on CPU, some batched products of attention) takes the nearest
  operand's."""
  module = re.match(r'HloModule (\S+?),?\s', text).group(1)
  parsed = [(match, line) for line in text.splitlines()
            if (match := _INSTRUCTION.match(line))]
  op_names = {match.group(1): (found.group(1) if (found := _OP_NAME.search(line)) else '')
              for match, line in parsed}
  operands = {match.group(1): re.findall(r'%([\w.-]+)', line[match.end():])
              for match, line in parsed}
  groups, members, library_calls = collections.defaultdict(list), {}, []
  for match, line in parsed:
    name = match.group(1)
    kernel = _DEDUPLICATED.search(line) or hlo_kernels.TRITON_CALL.search(line)
    op_name = op_names[name] or _nearest_op_name(name, op_names, operands)
    instruction = Instruction(match.group(2), op_name, inferred=not op_names[name], name=name)
    group = kernel.group(1) if kernel else name
    groups[group].append(instruction)
    members[name] = members[name.replace('.', '_')] = members[group] = group
    if _LIBRARY_CALL.search(line):
      library_calls.append(instruction)
  return Program(module, {name: groups[group] for name, group in members.items()},
                 library_calls)


def _nearest_op_name(name: str, op_names: dict[str, str], operands: dict[str, list[str]]
                     ) -> str:
  """The `op_name` of the first operand that has one, breadth first, a few levels deep."""
  frontier, seen = [name], {name}
  for _ in range(4):
    frontier = [o for n in frontier for o in operands[n] if o in op_names and o not in seen]
    seen.update(frontier)
    for operand in frontier:
      if op_names[operand]:
        return op_names[operand]
  return ''


def device_ops(trace: dict, module: str) -> list[dict]:
  """The first device's ops of `module`: kernels on an accelerator's streams, or the CPU's
  thunks without the loops and calls that enclose other thunks."""
  processes = {e['pid']: e['args']['name'] for e in trace['traceEvents']
               if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  events = [e for e in trace['traceEvents']
            if e.get('ph') == 'X' and e.get('args', {}).get('hlo_module') == module]
  devices = sorted(name for pid, name in processes.items() if name.startswith('/device:'))
  if devices:
    return [e for e in events if processes.get(e['pid']) == devices[0]]
  events = [e for e in events if e['args'].get('device_ordinal', '0') == '0']
  by_thread = collections.defaultdict(list)
  for event in events:
    by_thread[event['tid']].append(event)
  leaves = []
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e['ts'], -e['dur']))
    for event, following in zip(thread, thread[1:] + [None]):
      if following is None or following['ts'] >= event['ts'] + event['dur']:
        leaves.append(event)
  return leaves


def breakdown(trace: dict, hlo_text: str, steps: int) -> dict:
  """Microseconds a step by `(part, pass)` and by op, the share matched to the HLO, and the
  time of the longest chain of ops each consuming the one before (hlo_kernels.census): no
  concurrency makes the step shorter than that.

  A library's kernels carry the library's names (cuBLAS's `nvjet_...`); they match the
  module's library calls in order when each step launches one per call (cuBLAS may add a
  kernel of its own, such as a split-K reduction: then none match)."""
  program = read_hlo(hlo_text)
  ops = sorted(device_ops(trace, program.module), key=lambda op: op['ts'])
  unnamed = [op for op in ops if op['name'] not in program.ops and not _COPY.match(op['name'])]
  library = program.library_calls if len(unnamed) == steps * len(program.library_calls) else []
  by_part, by_op, by_instruction = (collections.Counter() for _ in range(3))
  runs, matched, library_runs = collections.Counter(), 0.0, 0
  for op in ops:
    group, instruction = program.ops.get(op['name']), None
    if group:
      instruction = group[runs[op['name']] % len(group)]
      key = hlo_kernels.part_of(instruction.op_name)
    elif _COPY.match(op['name']):
      key = (COPIES, '')
    elif library:
      instruction = library[library_runs % len(library)]
      key = hlo_kernels.part_of(instruction.op_name)
      library_runs += 1
    else:
      key = (UNMATCHED, '')
    if instruction:
      by_instruction[instruction.name] += op['dur'] / steps
    by_part[key] += op['dur'] / steps
    by_op[op['name']] += op['dur'] / steps
    runs[op['name']] += 1
    matched += op['dur'] if key[0] != UNMATCHED else 0.0
  total = sum(op['dur'] for op in ops)
  chain = hlo_kernels.census(hlo_text).longest_chain
  timed = [k for k in chain if k.name in by_instruction]
  return {'module': program.module, 'steps': steps, 'ops_per_step': len(ops) / steps,
          'step_us': total / steps, 'matched': matched / total if total else 0.0,
          'by_part': by_part, 'by_op': by_op, 'runs': runs, 'instructions': program.ops,
          'chain_ops': len(chain), 'chain_timed_ops': len(timed),
          'chain_us': sum(by_instruction[k.name] for k in timed)}


def print_breakdown(result: dict, top: int) -> None:
  print(f"{result['module']}: {result['step_us'] / 1e3:,.2f} ms of ops a step (summed: a "
        f"CPU runs some side by side), {result['ops_per_step']:,.0f} ops, "
        f"{100 * result['matched']:.1f}% of the time matched to HLO instructions")
  print(f"longest chain of ops each consuming the one before: {result['chain_ops']} ops, "
        f"{result['chain_us'] / 1e3:,.2f} ms a step over the {result['chain_timed_ops']} "
        'matched (no concurrency makes a step shorter)')
  parts = collections.defaultdict(dict)
  for (part, direction), us in result['by_part'].items():
    parts[part][direction] = us
  total = result['step_us']
  print(f"{'part':40s} {'forward':>10s} {'backward':>10s} {'total':>10s} {'share':>6s}  (us)")
  for part, times in sorted(parts.items(), key=lambda item: -sum(item[1].values())):
    print(f"{part[:40]:40s} {times.get('forward', 0):10,.0f} {times.get('backward', 0):10,.0f}"
          f" {sum(times.values()):10,.0f} {100 * sum(times.values()) / total:5.1f}%")
  print('costliest ops (us a step, runs a step, shape, op_name; ~: from an operand):')
  for name, us in result['by_op'].most_common(top):
    group = result['instructions'].get(name)
    shared = f' (and {len(group) - 1} more)' if group and len(group) > 1 else ''
    where = (f"{group[0].shape[:40]} {'~' if group[0].inferred else ''}"
             f'{group[0].op_name[-70:]}{shared}' if group else '-')
    runs = result['runs'][name] / result['steps']
    print(f'{us:10,.1f} {runs:5g}  {name[:40]:40s} {where}')


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: python -m experiments.speed.trace_breakdown PROFILE_DIR')
  traces = sorted(glob.glob(os.path.join(argv[1], '**', '*.trace.json.gz'), recursive=True),
                  key=os.path.getmtime)
  hlo_path = os.path.join(argv[1], HLO_FILE)
  if not traces or not os.path.exists(hlo_path):
    raise app.UsageError(f'{argv[1]}: expected a *.trace.json.gz and {HLO_FILE} (written by '
                         'python -m experiments.speed.benchmark --profile_dir)')
  with gzip.open(traces[-1]) as f:
    trace = json.load(f)
  with open(hlo_path) as f:
    hlo_text = f.read()
  print_breakdown(breakdown(trace, hlo_text, FLAGS.steps), FLAGS.top)


FLAGS = flags.FLAGS

if __name__ == '__main__':  # benchmark.py imports this module, with flags of its own
  flags.DEFINE_integer('steps', TRACED_STEPS, 'Train steps in the trace.')
  flags.DEFINE_integer('top', 15, 'Costliest ops to list.')
  app.run(main)
