"""A lower bound on a compiled step's time, read from the compiled program: a roofline per op.

XLA's own estimate (`cost_analysis()['optimal_seconds']`) bounds nothing: its cost model
takes a while loop's body once, gives up on some ops (an "unknown cost" sentinel, e.g. a
scatter offloaded to v5p's SparseCore) and comes out below what the program's own FLOPs take
at the chips' peak, sometimes by 10x, sometimes negative. This reads the optimised,
partitioned program one chip runs (`compiled.as_text()`) and charges each op what the chip
cannot do faster than:

- an op that runs on the TensorCore (a fusion, a convolution, a copy, ...): the larger of its
  matmul FLOPs over the chip's peak and the bytes it reads and writes in HBM over the HBM
  bandwidth. Operands the compiler placed in on-chip memory (layouts marked `S(n)`) cost no
  HBM bytes; a fused operand that is only sliced costs the slice; an in-place update costs
  the update. The ops run one after another on a core, so their times add up.
- a collective within a slice (all-reduce, all-gather, reduce-scatter, all-to-all,
  collective-permute): the bytes a chip sends in a ring over its group, over the chip's ICI
  bandwidth. Across slices (the send/recv pairs the compiler emits for the data-centre
  network), the bytes over the chip's DCN bandwidth.
- a while loop: its body times its trip count (XLA's `known_trip_count`, else the bound in
  its condition); a conditional: its most expensive branch; a call or an async op: what it
  calls.

Collectives and prefetches may overlap the TensorCore's work, so the bound is the largest of:
the ops' summed times on the core, every HBM byte (prefetches included) over the bandwidth,
the ICI time and the DCN time. It is a bound computed from the program, not a measurement:
a real step is slower by whatever the chip does not overlap or does not reach the peak in.

Matmuls count as train/program_flops.py counts them: 2 x output elements x the contracted
size. TPU programs write batched matmuls (attention's) as convolutions whose window is
padded: only the kernel taps that land on real input count, not the padding.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re

from big_pretrain.accelerators import Accelerator

# Bytes per element of XLA's primitive types ('token' and tuples carry none).
_DTYPE_BYTES = {
    'pred': 1, 's2': 0.25, 'u2': 0.25, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2,
    'u16': 2, 's32': 4, 'u32': 4, 's64': 8, 'u64': 8, 'f16': 2, 'bf16': 2, 'f32': 4, 'f64': 8,
    'c64': 8, 'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1, 'f8e4m3': 1, 'f8e4m3b11fnuz': 1,
    'f8e4m3fnuz': 1, 'f8e5m2fnuz': 1, 'f8e3m4': 1, 'f4e2m1fn': 0.5, 'f8e8m0fnu': 1,
    'token': 0,
}
# One array type: 'bf16[8,197,768]{2,1,0:T(8,128)(2,1)S(1)}' (the layout is optional).
_ARRAY = re.compile(r'([a-z][a-z0-9]*)\[([\d,]*)\](\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})?')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([^ ]+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$')
_COMPUTATION = re.compile(r'^(ENTRY )?%([^ ]+) ')
_OPERAND = re.compile(r'%([^ ,)]+)')
_CALLED = re.compile(r'\b(calls|to_apply|body|condition)=%([^ ,]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRUE_FALSE = re.compile(r'(?:true|false)_computation=%([^ ,]+)')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_REPLICA_GROUPS = re.compile(
    r"replica_groups=(\{[^ ]*\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?|mesh\[[^\]]*\] \{[^}]*\})")
_MESH_AXIS_SIZE = re.compile(r"'([^']+)'=(\d+)")
_DIM_LABELS = re.compile(r'dim_labels=([^_]+)_([^-]+)->([^, ]+)')
_WINDOW = re.compile(r'window=\{([^}]*)\}')
_GROUP_COUNT = re.compile(r'(feature|batch)_group_count=(\d+)')
_CONTRACTING = re.compile(r'lhs_contracting_dims=\{([\d,]*)\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_LAYER_INDEX = re.compile(r'(\w)_\d+(?=/|$)')
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="([A-Z_]+)"')

# Ops that move no data and do no work of their own.
_FREE = frozenset({
    'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'after-all',
    'partition-id', 'replica-id', 'copy-done', 'all-reduce-done', 'all-gather-done',
    'collective-permute-done', 'async-done', 'async-update', 'send-done', 'recv',
    'recv-done', 'opt-barrier', 'add-dependency', 'domain', 'iota',
})
_ICI_COLLECTIVES = frozenset({
    'all-reduce', 'all-reduce-start', 'all-gather', 'all-gather-start', 'reduce-scatter',
    'all-to-all', 'collective-permute', 'collective-permute-start', 'ragged-all-to-all',
    'collective-broadcast',
})
_SLICING = frozenset({'dynamic-slice', 'slice', 'gather'})
TERMS = ('compute', 'HBM', 'ICI', 'DCN')


@dataclasses.dataclass(frozen=True)
class Chip:
  """What one chip can do per second: matmul FLOPs, HBM bytes, bytes sent over ICI in a
  collective, bytes sent across slices (None: not published, not bounded)."""
  peak_flops: float
  hbm_bandwidth: float
  ici_bandwidth: float
  dcn_bandwidth: float | None = None

  @classmethod
  def of(cls, accelerator: Accelerator, peak_flops: float | None = None) -> Chip:
    """A chip of an accelerators.ACCELERATORS entry, at `peak_flops` (default: its bf16
    peak)."""
    return cls(accelerator.bf16_flops if peak_flops is None else peak_flops,
               accelerator.hbm_bandwidth, accelerator.ici_bandwidth, accelerator.dcn_bandwidth)


@dataclasses.dataclass
class OpCost:
  """One op of the program, over every time the step runs it (loops multiplied out)."""
  name: str          # what the op computes (its op_name metadata), else its HLO name
  opcode: str
  count: int = 0     # times per step
  flops: float = 0.0
  hbm_bytes: float = 0.0
  ici_bytes: float = 0.0
  dcn_bytes: float = 0.0
  seconds: float = 0.0
  term: str = ''     # what bounds it: 'compute', 'HBM', 'ICI' or 'DCN'

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Roofline:
  """Per chip and per step (see the module doc): the ops' costs, and what runs beside them."""
  ops: list = dataclasses.field(default_factory=list)  # OpCost, costliest first
  async_bytes: float = 0.0       # HBM bytes beside the core: prefetches, SparseCore offloads
  exact: bool = True             # every loop's trip count known

  def _total(self, field: str, term: str | None = None) -> float:
    return sum(getattr(op, field) for op in self.ops if term is None or op.term == term)

  @property
  def flops(self) -> float:
    return self._total('flops')

  @property
  def hbm_bytes(self) -> float:  # the core's ops' own
    return self._total('hbm_bytes')

  @property
  def ici_bytes(self) -> float:
    return self._total('ici_bytes')

  @property
  def dcn_bytes(self) -> float:
    return self._total('dcn_bytes')

  @property
  def compute_seconds(self) -> float:  # ops bound by their FLOPs, summed
    return self._total('seconds', 'compute')

  @property
  def memory_seconds(self) -> float:  # ops bound by their HBM bytes, summed
    return self._total('seconds', 'HBM')

  @property
  def ici_seconds(self) -> float:
    return self._total('seconds', 'ICI')

  @property
  def dcn_seconds(self) -> float:
    return self._total('seconds', 'DCN')

  @property
  def core_seconds(self) -> float:
    return self.compute_seconds + self.memory_seconds

  def term_seconds(self, chip: Chip) -> dict:
    return {'compute': self.compute_seconds,
            'HBM': max(self.memory_seconds,
                       (self.hbm_bytes + self.async_bytes) / chip.hbm_bandwidth
                       - self.compute_seconds),
            'ICI': self.ici_seconds, 'DCN': self.dcn_seconds}

  def seconds(self, chip: Chip) -> float:
    """The bound: the step takes at least this long."""
    all_hbm = (self.hbm_bytes + self.async_bytes) / chip.hbm_bandwidth
    return max(self.core_seconds, all_hbm, self.ici_seconds, self.dcn_seconds)

  def dominant(self, chip: Chip) -> str:
    """The term the bound is made of most: compute, HBM (the core's ops), ICI or DCN."""
    terms = self.term_seconds(chip)
    return max(TERMS, key=lambda term: terms[term])

  def top(self, count: int = 5) -> list:
    return self.ops[:count]


@dataclasses.dataclass
class _Instruction:
  name: str
  type_text: str
  opcode: str
  operands: list    # the names of its operands
  arguments: str    # the text in its parentheses: a parameter's index, a constant's value
  attributes: str

  @functools.cached_property
  def arrays(self) -> tuple:
    """((dtype, dims, on_chip), ...) of its result: one array, or a tuple's."""
    return _arrays(self.type_text)


@dataclasses.dataclass
class _Computation:
  name: str
  instructions: list = dataclasses.field(default_factory=list)
  by_name: dict = dataclasses.field(default_factory=dict)
  root: str = ''


# --- Types ------------------------------------------------------------------------------

def _arrays(type_text: str) -> tuple:
  """((dtype, dims, on_chip), ...) of a type: one array, or a tuple's arrays (on_chip: in a
  memory space other than HBM, `S(n)` in its layout)."""
  found = []
  for dtype, dims, layout in _ARRAY.findall(type_text):
    shape = tuple(int(d) for d in dims.split(',') if d)
    on_chip = bool(layout) and re.search(r'S\(\d+\)', layout) is not None
    found.append((dtype, shape, on_chip))
  return tuple(found)


def _bytes(instruction: '_Instruction', hbm_only: bool = False,
           first_only: bool = False) -> float:
  """The bytes of an op's result (only those in HBM; only a tuple's first array)."""
  total = 0.0
  arrays = instruction.arrays[:1] if first_only else instruction.arrays
  for dtype, shape, on_chip in arrays:
    if hbm_only and on_chip:
      continue
    total += _DTYPE_BYTES.get(dtype, 4) * math.prod(shape)
  return total


def _shape(instruction: '_Instruction') -> tuple:
  return instruction.arrays[0][1] if instruction.arrays else ()


# --- Reading the program ------------------------------------------------------------------

def parse(text: str) -> tuple[dict, str]:
  """The computations of an HLO module's text, and the entry's name."""
  computations, entry, current = {}, '', None
  for line in text.splitlines():
    if not line or line[0] == '}':
      current = None if line[:1] == '}' else current
      continue
    if line[0] != ' ':
      match = _COMPUTATION.match(line)
      if match and line.rstrip().endswith('{'):
        current = _Computation(match.group(2))
        computations[current.name] = current
        if match.group(1):
          entry = current.name
      continue
    if current is None:
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, type_text, opcode, rest = match.groups()
    depth, end = 1, len(rest)
    for index, char in enumerate(rest):  # the operand list's closing parenthesis
      if char == '(':
        depth += 1
      elif char == ')':
        depth -= 1
        if depth == 0:
          end = index
          break
    instruction = _Instruction(name, type_text, opcode, _OPERAND.findall(rest[:end]),
                               rest[:end], rest[end + 1:])
    current.instructions.append(instruction)
    current.by_name[name] = instruction
    if line.lstrip().startswith('ROOT '):
      current.root = name
  return computations, entry


# --- FLOPs ------------------------------------------------------------------------------

def _dot_flops(instruction: _Instruction, computation: _Computation) -> float:
  lhs = computation.by_name.get(instruction.operands[0]) if instruction.operands else None
  match = _CONTRACTING.search(instruction.attributes)
  if lhs is None or match is None:
    return 0.0
  lhs_shape = _shape(lhs)
  contracted = math.prod(lhs_shape[int(d)] for d in match.group(1).split(',') if d)
  return 2.0 * math.prod(_shape(instruction)) * contracted


def _taps(n_in: int, n_out: int, size: int, stride: int, pad_low: int, lhs_dilation: int,
          rhs_dilation: int) -> int:
  """(output position, kernel tap) pairs of one spatial dimension whose tap lands on a real
  input element (not padding, not a dilation hole). A reversed kernel permutes its taps:
  the same pairs land."""
  last = (n_in - 1) * lhs_dilation  # the last real element, in dilated positions
  pairs = 0
  for tap in range(size):
    offset = tap * rhs_dilation - pad_low  # where output 0's tap lands
    # Outputs o with 0 <= o * stride + offset <= last ...
    low = max(0, -(offset // stride))
    high = min(n_out - 1, (last - offset) // stride)
    if high < low:
      continue
    # ... and o * stride + offset a multiple of lhs_dilation: o = first (mod period).
    common = math.gcd(stride, lhs_dilation)
    if offset % common:
      continue
    period = lhs_dilation // common
    first = (-offset // common) * pow(stride // common, -1, period) % period if period > 1 else 0
    pairs += (high - first) // period - (low - 1 - first) // period
  return pairs


def _window(attributes: str) -> dict:
  match = _WINDOW.search(attributes)
  fields = {}
  for item in (match.group(1).split() if match else []):
    key, _, value = item.partition('=')
    fields[key] = value.split('x')
  return fields


def _convolution_flops(instruction: _Instruction, computation: _Computation) -> float:
  operands = [computation.by_name.get(name) for name in instruction.operands[:2]]
  labels = _DIM_LABELS.search(instruction.attributes)
  if None in operands or len(operands) < 2 or labels is None:
    return 0.0
  lhs_shape, rhs_shape = _shape(operands[0]), _shape(operands[1])
  out_shape = _shape(instruction)
  lhs_labels, rhs_labels, out_labels = labels.groups()
  window = _window(instruction.attributes)
  spatial = [label for label in lhs_labels if label.isdigit()]
  taps = 1
  for index, label in enumerate(sorted(spatial, key=int)):
    def field(key, default, index=index):
      values = window.get(key)
      return values[index] if values and index < len(values) else default
    pad_low = int(field('pad', '0_0').split('_')[0])
    taps *= _taps(lhs_shape[lhs_labels.index(label)], out_shape[out_labels.index(label)],
                  rhs_shape[rhs_labels.index(label)], int(field('stride', '1')), pad_low,
                  int(field('lhs_dilate', '1')), int(field('rhs_dilate', '1')))
  groups = dict(_GROUP_COUNT.findall(instruction.attributes))
  in_features = lhs_shape[lhs_labels.index('f')] // int(groups.get('feature', 1))
  return (2.0 * out_shape[out_labels.index('b')] * out_shape[out_labels.index('f')]
          * in_features * taps)


class _Reader:
  """Costs of the computations of one program, each computed once."""

  def __init__(self, computations: dict, chip: Chip, num_slices: int):
    self.computations = computations
    self.chip = chip
    self.num_slices = num_slices
    self._flops: dict[str, float] = {}
    self._sliced: dict[str, dict] = {}

  # FLOPs of a fused (or called) computation, its nested fusions included.
  def flops(self, name: str) -> float:
    if name not in self._flops:
      self._flops[name] = 0.0  # a cycle counts nothing
      computation = self.computations.get(name)
      total = 0.0
      for instruction in computation.instructions if computation else ():
        if instruction.opcode == 'convolution':
          total += _convolution_flops(instruction, computation)
        elif instruction.opcode == 'dot':
          total += _dot_flops(instruction, computation)
        elif instruction.opcode in ('fusion', 'call', 'custom-call'):
          for _, called in _CALLED.findall(instruction.attributes):
            total += self.flops(called)
      self._flops[name] = total
    return self._flops[name]

  def fused_operand_bytes(self, name: str) -> dict[int, float]:
    """Parameter index -> the bytes a fusion reads of it, for a parameter it only slices
    (the slices' bytes); a parameter missing here is read whole."""
    if name not in self._sliced:
      computation = self.computations.get(name)
      sliced = {}
      if computation is not None:
        users = collections.defaultdict(list)
        for instruction in computation.instructions:
          for operand in instruction.operands:
            users[operand].append(instruction)
        for instruction in computation.instructions:
          if instruction.opcode != 'parameter':
            continue
          index = int(instruction.arguments)
          uses = users.get(instruction.name, [])
          if uses and all(use.opcode in _SLICING and use.operands[0] == instruction.name
                          for use in uses):
            sliced[index] = sum(_bytes(use) for use in uses)
          elif uses and all(use.opcode == 'dynamic-update-slice'
                            and use.operands[0] == instruction.name for use in uses):
            sliced[index] = 0.0  # updated in place: the update is written, nothing read
      self._sliced[name] = sliced
    return self._sliced[name]

  def updated_in_place(self, name: str) -> float | None:
    """The bytes a fusion whose root updates a buffer in place writes (its updates), or
    None when its root writes its whole result."""
    computation = self.computations.get(name)
    if computation is None:
      return None
    root = computation.by_name.get(computation.root)
    roots = ([computation.by_name.get(n) for n in root.operands]
             if root is not None and root.opcode == 'tuple' else [root])
    if not roots or any(r is None or r.opcode != 'dynamic-update-slice' for r in roots):
      return None
    total = 0.0
    for r in roots:
      update = computation.by_name.get(r.operands[1]) if len(r.operands) > 1 else None
      total += _bytes(update) if update is not None else 0.0
    return total

  # --- The program's ops, with how often each runs.
  def walk(self, name: str, times: int, costs: dict, roofline: Roofline,
           stack: tuple = ()) -> None:
    computation = self.computations.get(name)
    if computation is None or name in stack:
      return
    stack += (name,)
    for instruction in computation.instructions:
      opcode = instruction.opcode
      if opcode in _FREE:
        continue
      if opcode == 'while':
        called = dict(_CALLED.findall(instruction.attributes))
        trips = self.trip_count(instruction, called.get('condition'))
        if trips is None:
          roofline.exact, trips = False, 1
        self.walk(called.get('body', ''), times * trips, costs, roofline, stack)
        continue
      if opcode == 'conditional':
        self.walk_costliest_branch(instruction, times, costs, roofline, stack)
        continue
      if opcode in ('call', 'async-start'):
        for _, called in _CALLED.findall(instruction.attributes):
          self.walk(called, times, costs, roofline, stack)
        continue
      if opcode == 'call-start':  # an async call, e.g. a scatter offloaded to a SparseCore
        for _, called in _CALLED.findall(instruction.attributes):
          roofline.async_bytes += times * self.offloaded_bytes(called)
        continue
      if opcode == 'copy-start':  # a prefetch or eviction between HBM and on-chip memory
        arrays = instruction.arrays
        if len(arrays) >= 2 and arrays[0][2] != arrays[1][2]:
          roofline.async_bytes += times * _bytes(instruction, first_only=True)
        continue
      self.charge(instruction, computation, times, costs)

  def walk_costliest_branch(self, instruction, times, costs, roofline, stack) -> None:
    match = _BRANCHES.search(instruction.attributes)
    branches = (_OPERAND.findall(match.group(1)) if match
                else _TRUE_FALSE.findall(instruction.attributes))
    best = None
    for branch in branches:
      trial_costs, trial = {}, Roofline()
      self.walk(branch, times, trial_costs, trial, stack)
      trial.ops = list(trial_costs.values())
      seconds = max(trial.core_seconds, trial.ici_seconds, trial.dcn_seconds)
      if best is None or seconds > best[0]:
        best = (seconds, trial_costs, trial)
    if best is None:
      return
    _, trial_costs, trial = best
    for key, cost in trial_costs.items():
      _merge(costs, key, cost)
    roofline.async_bytes += trial.async_bytes
    roofline.exact = roofline.exact and trial.exact

  def trip_count(self, instruction: _Instruction, condition: str | None) -> int | None:
    match = _TRIP_COUNT.search(instruction.attributes)
    if match:
      return int(match.group(1))
    computation = self.computations.get(condition or '')
    if computation is None:
      return None
    for candidate in computation.instructions:  # `i < N` with N a constant
      if candidate.opcode == 'compare' and 'direction=LT' in candidate.attributes:
        for operand in candidate.operands[1:]:
          constant = computation.by_name.get(operand)
          if constant is not None and constant.opcode == 'constant':
            value = re.fullmatch(r'\s*(\d+)\s*', constant.arguments)
            if value:
              return int(value.group(1))
    return None

  def charge(self, instruction: _Instruction, computation: _Computation, times: int,
             costs: dict) -> None:
    opcode = instruction.opcode
    chip = self.chip
    cost = OpCost(_op_name(instruction), opcode)
    if opcode in _ICI_COLLECTIVES:
      group = _group_size(instruction.attributes)
      operand_bytes = sum(_bytes(computation.by_name[o])
                          for o in instruction.operands if o in computation.by_name)
      result_bytes = _bytes(instruction, first_only=opcode.endswith('-start'))
      share = (group - 1) / group if group > 1 else 0.0
      if opcode.startswith('all-reduce'):
        sent = 2 * share * operand_bytes
      elif opcode.startswith('all-gather'):
        sent = share * result_bytes
      elif opcode.startswith('collective-permute'):
        sent = operand_bytes
      else:
        sent = share * operand_bytes
      cost.ici_bytes = sent
      cost.seconds = sent / chip.ici_bandwidth
      cost.term = 'ICI'
    elif opcode == 'send':
      transfer = _MEGASCALE.search(instruction.attributes)
      payload = _bytes(instruction, first_only=True)
      slices = max(self.num_slices, 2)
      ring = (2 if transfer and transfer.group(1) == 'ALL_REDUCE' else 1) * (slices - 1) / slices
      cost.name = f"{(transfer.group(1) if transfer else 'send').lower()} across slices"
      cost.dcn_bytes = payload
      cost.seconds = ring * payload / chip.dcn_bandwidth if chip.dcn_bandwidth else 0.0
      cost.term = 'DCN'
    else:
      flops, hbm = self.core_op(instruction, computation)
      cost.flops, cost.hbm_bytes = flops, hbm
      compute, memory = flops / chip.peak_flops, hbm / chip.hbm_bandwidth
      cost.seconds = max(compute, memory)
      cost.term = 'compute' if compute >= memory and flops else 'HBM'
    _merge(costs, (cost.name, opcode, cost.term),
           OpCost(cost.name, opcode, times, cost.flops * times, cost.hbm_bytes * times,
                  cost.ici_bytes * times, cost.dcn_bytes * times, cost.seconds * times,
                  cost.term))

  def offloaded_bytes(self, name: str) -> float:
    computation = self.computations.get(name)
    return sum(self.core_op(instruction, computation)[1]
               for instruction in (computation.instructions if computation else ())
               if instruction.opcode not in _FREE)

  def core_op(self, instruction: _Instruction, computation: _Computation) -> tuple:
    """(matmul FLOPs, HBM bytes) of an op the TensorCore runs."""
    opcode = instruction.opcode
    operands = [computation.by_name.get(o) for o in instruction.operands]
    called = [c for _, c in _CALLED.findall(instruction.attributes)]
    if opcode == 'convolution':
      flops = _convolution_flops(instruction, computation)
    elif opcode == 'dot':
      flops = _dot_flops(instruction, computation)
    elif opcode == 'fusion' and called:
      flops = self.flops(called[0])
    else:
      flops = 0.0
    sliced = self.fused_operand_bytes(called[0]) if opcode == 'fusion' and called else {}
    read = 0.0
    for index, operand in enumerate(operands):
      if operand is None:
        continue
      read += sliced[index] if index in sliced else _bytes(operand, hbm_only=True)
    if opcode == 'scatter' and len(operands) == 3 and None not in operands:
      # in place: the indices and updates are read, the updated elements written
      return flops, _bytes(operands[1]) + 2 * _bytes(operands[2])
    if opcode == 'dynamic-update-slice':  # in place: the update is read and written
      update = operands[1] if len(operands) > 1 and operands[1] is not None else None
      update_bytes = _bytes(update) if update else 0.0
      return flops, 2 * update_bytes
    if opcode in _SLICING and operands and operands[0] is not None:
      read -= _bytes(operands[0], hbm_only=True)
      read += _bytes(instruction)  # what is read of the sliced operand
    written = self.updated_in_place(called[0]) if opcode == 'fusion' and called else None
    if written is None:
      written = _bytes(instruction, hbm_only=True)
    return flops, read + written


def _op_name(instruction: _Instruction) -> str:
  match = _OP_NAME.search(instruction.attributes)
  if not match:
    return instruction.name
  parts = [part for part in match.group(1).split('/')
           if not part.startswith(('jit(', 'jvp(', 'transpose(', 'vmap(', 'checkpoint',
                                   'rematted_computation', 'remat'))]
  # One name for every layer's copy of an op: block_7/mlp/fc1 -> block_*/mlp/fc1.
  return _LAYER_INDEX.sub(r'\1_*', '/'.join(parts[-4:])) or instruction.name


def _group_size(attributes: str) -> int:
  match = _REPLICA_GROUPS.search(attributes)
  if not match:
    return 1
  text = match.group(1)
  if text.startswith('mesh['):  # mesh['axis_0'=4,'axis_1'=2] {'axis_0'}: the named axes
    sizes = dict(_MESH_AXIS_SIZE.findall(text[:text.index(']')]))
    axes = re.findall(r"'([^']+)'", text[text.index(']') + 1:])
    return math.prod(int(sizes.get(axis, 1)) for axis in axes)
  if text.startswith('['):  # iota form: [groups,size]<=[devices]
    dims = [int(d) for d in text[1:text.index(']')].split(',') if d]
    return dims[-1] if dims else 1
  first = re.search(r'\{([\d,]*)\}', text[1:])
  return len([d for d in first.group(1).split(',') if d]) if first else 1


def _merge(costs: dict, key, cost: OpCost) -> None:
  if key not in costs:
    costs[key] = dataclasses.replace(cost)
    return
  total = costs[key]
  total.count += cost.count
  total.flops += cost.flops
  total.hbm_bytes += cost.hbm_bytes
  total.ici_bytes += cost.ici_bytes
  total.dcn_bytes += cost.dcn_bytes
  total.seconds += cost.seconds


def roofline(compiled_text: str, chip: Chip, num_slices: int = 1) -> Roofline:
  """The roofline of one chip's compiled program (`compiled.as_text()`): see the module doc."""
  computations, entry = parse(compiled_text)
  result = Roofline()
  costs: dict = {}
  _Reader(computations, chip, num_slices).walk(entry, 1, costs, result)
  result.ops = sorted(costs.values(), key=lambda cost: -cost.seconds)
  return result
