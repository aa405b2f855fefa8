"""The matmul FLOPs a lowered program does, loops multiplied out: a count to check the analytic one.

XLA's `cost_analysis()` counts a while loop's body once, so for a scanned stack
(nn.scan lowers to a while loop over the layers) it reports a few percent of the
step's FLOPs. This reads the program as JAX lowered it (StableHLO text, global
shapes, before XLA partitions or fuses anything) and counts what train/mfu.py
counts: 2 * m * n * k for each `dot_general`, and for each `convolution` 2 x the
output's elements x the kernel's elements per output feature; a call counts its
function's FLOPs, and a while loop's body counts its trip count times, read from
its condition (`compare LT, counter, constant`, the form jax.lax.scan and
fori_loop with static bounds lower to). A loop whose trip count is not such a
constant counts once, and the result says so (`exact`). Rematerialised
forwards are in the program, so they are counted: with remat this is more than
the analytic count, as hardware FLOPs are more than model FLOPs.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_FUNC = re.compile(r'^\s*func\.func\s+(?:public|private)?\s*@([\w.$-]+)\(')
_TENSOR = re.compile(r'tensor<([^>]*)>')
_CONSTANT = re.compile(r'(%[\w#.-]+) = stablehlo\.constant dense<(-?\d+)> : tensor<i\d+>')
_COMPARE_LT = re.compile(r'stablehlo\.compare\s+LT,\s*(%[\w#.-]+),\s*(%[\w#.-]+)')
_CALL = re.compile(r'(?:func\.)?call @([\w.$-]+)\(')
_CONTRACTING = re.compile(r'contracting_dims = \[([\d, ]*)\] x \[([\d, ]*)\]')
_CONV_DIMS = re.compile(r'dim_numbers = \[([^\]]*)\]x\[([^\]]*)\]->\[([^\]]*)\]')
_FEATURE_GROUPS = re.compile(r'feature_group_count = (\d+)')
_BATCH_GROUPS = re.compile(r'batch_group_count = (\d+)')


@dataclasses.dataclass(frozen=True)
class ProgramFlops:
  flops: float  # matmul and convolution FLOPs of the whole program, loops multiplied out
  exact: bool   # False when a loop's trip count was not a constant (counted once)
  loops: int    # while loops found (a scanned stack has one per pass over its layers)


def _dims(tensor_type: str) -> list[int]:
  """'16x4x192xf32' -> [16, 4, 192]; a scalar 'f32' -> []."""
  parts = tensor_type.split('x')
  return [int(part) for part in parts[:-1]]


def _operand_and_result_types(line: str) -> tuple[list[list[int]], list[int]] | None:
  """The dims of an op's operands and result from its trailing '(types) -> type'."""
  signature = line.rsplit(' : ', 1)[-1]
  if '->' not in signature:
    return None
  operands, result = signature.split('->', 1)
  operand_types = _TENSOR.findall(operands)
  result_types = _TENSOR.findall(result)
  if not operand_types or not result_types:
    return None
  return [_dims(t) for t in operand_types], _dims(result_types[0])


def _dot_flops(line: str) -> float:
  types = _operand_and_result_types(line)
  match = _CONTRACTING.search(line)
  if types is None or match is None:
    return 0.0
  (lhs, _, *_), result = types
  contracting = [int(d) for d in match.group(1).split(',') if d.strip()]
  return 2.0 * math.prod(result) * math.prod(lhs[d] for d in contracting)


def _convolution_flops(line: str) -> float:
  types = _operand_and_result_types(line)
  match = _CONV_DIMS.search(line)
  if types is None or match is None:
    return 0.0
  (_, rhs, *_), result = types
  kernel_labels = [label.strip() for label in match.group(2).split(',')]
  per_output = math.prod(size for size, label in zip(rhs, kernel_labels) if label != 'o')
  groups = _FEATURE_GROUPS.search(line)
  batch_groups = _BATCH_GROUPS.search(line)
  per_output //= max(int(groups.group(1)) if groups else 1, 1)
  per_output //= max(int(batch_groups.group(1)) if batch_groups else 1, 1)
  return 2.0 * math.prod(result) * per_output


def _braces(line: str) -> int:
  """The net '{' minus '}' of a line, outside quoted strings (attributes such as
  mhlo.sharding = "{devices=[4,1]<=[4]}" hold braces)."""
  depth, quoted = 0, False
  for char in line:
    if char == '"':
      quoted = not quoted
    elif not quoted and char == '{':
      depth += 1
    elif not quoted and char == '}':
      depth -= 1
  return depth


@dataclasses.dataclass
class _Region:
  """What one region (a function's body, or a while loop's body) does, before its caller
  multiplies it: its own FLOPs and its calls."""
  flops: float = 0.0
  calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  exact: bool = True
  loops: int = 0


@dataclasses.dataclass
class _Loop:
  """A while loop being read: its condition's constants and bound, then its body."""
  depth: int                      # brace depth at the while op's line
  constants: dict = dataclasses.field(default_factory=dict)
  trip_count: int | None = None
  in_body: bool = False
  body: _Region = dataclasses.field(default_factory=_Region)


def _read_functions(text: str) -> dict[str, _Region]:
  functions: dict[str, _Region] = {}
  name, region, depth, loops = None, None, 0, []
  constants_outside: dict = {}
  for line in text.splitlines():
    if name is None:
      match = _FUNC.match(line)
      if match:
        name, region, depth, loops, constants_outside = match.group(1), _Region(), 0, [], {}
        depth += _braces(line)
      continue
    current = loops[-1].body if loops and loops[-1].in_body else region
    if constant := _CONSTANT.search(line):
      (loops[-1].constants if loops and not loops[-1].in_body else constants_outside)[
          constant.group(1)] = int(constant.group(2))
    if 'stablehlo.while' in line:
      loops.append(_Loop(depth))
    elif loops and not loops[-1].in_body and (compare := _COMPARE_LT.search(line)):
      bound = loops[-1].constants.get(compare.group(2), constants_outside.get(compare.group(2)))
      loops[-1].trip_count = bound
    elif loops and not loops[-1].in_body and re.match(r'^\s*\}\s*do\s*\{', line):
      loops[-1].in_body = True
      continue  # '} do {' closes the condition and opens the body: depth unchanged
    elif 'stablehlo.dot_general' in line:
      current.flops += _dot_flops(line)
    elif 'stablehlo.convolution' in line:
      current.flops += _convolution_flops(line)
    elif call := _CALL.search(line):
      current.calls[call.group(1)] += 1
    depth += _braces(line)
    if loops and loops[-1].in_body and depth == loops[-1].depth:  # the loop's body closed
      loop = loops.pop()
      outer = loops[-1].body if loops and loops[-1].in_body else region
      trips = loop.trip_count if loop.trip_count and loop.trip_count > 0 else 1
      outer.flops += trips * loop.body.flops
      for callee, count in loop.body.calls.items():
        outer.calls[callee] += trips * count
      outer.exact = outer.exact and loop.body.exact and loop.trip_count is not None
      outer.loops += 1 + loop.body.loops
    if depth <= 0:
      functions[name] = region
      name = None
  return functions


def program_flops(lowered_text: str, entry: str = 'main') -> ProgramFlops:
  """The matmul FLOPs of a lowered program's `entry` function (see the module doc)."""
  functions = _read_functions(lowered_text)
  totals: dict[str, tuple[float, bool, int]] = {}

  def total(name: str, seen: tuple[str, ...] = ()) -> tuple[float, bool, int]:
    if name in totals:
      return totals[name]
    region = functions.get(name)
    if region is None or name in seen:
      return 0.0, True, 0
    flops, exact, loops = region.flops, region.exact, region.loops
    for callee, count in region.calls.items():
      callee_flops, callee_exact, callee_loops = total(callee, seen + (name,))
      flops += count * callee_flops
      exact = exact and callee_exact
      loops += count * callee_loops
    totals[name] = (flops, exact, loops)
    return totals[name]

  flops, exact, loops = total(entry)
  return ProgramFlops(flops, exact, loops)
