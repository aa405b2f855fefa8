"""Cloud TPU slices by name, and what the TPU compiler needs to compile for one on any machine.

A slice's name is its Cloud TPU accelerator type: 'v4-32', 'v5p-256' (these
count TensorCores, two per chip), 'v5litepod-16' or 'v5e-16', 'v6e-64' (these
count chips). `parse_slice` turns one into its generation, chip count and the
topology the TPU compiler names ('v5p:4x4x8'); `topology_devices` gives that
topology's devices, from the libtpu wheel, on a host without a TPU: a program
can then be compiled for them (`jax.jit(...).lower(...).compile()`), and its
memory_analysis() says what one chip would hold. Nothing runs on them.

The generations, their names' rules, memory per device (HBM, which a device that does not
report its memory, a topology's, is taken to have) and largest slice, beyond which
`parse_slice` refuses a name, are accelerators.ACCELERATORS' entries with slice rules.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

from big_pretrain.accelerators import GIB, Accelerator, tpu_generations

# Cloud TPU documents no limit on the slices of a Multislice; the TPU compiler of libtpu
# 0.0.42.1 aborts the process on 512 or more ('Check failed: NumSlices() < kMaxNumSlices').
MAX_SLICES = 511


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A slice (or `num_slices` identical slices, joined by the data-centre network)."""
  name: str                 # as asked for: 'v5p-256'
  generation: Accelerator   # an entry of accelerators.ACCELERATORS with slice rules
  chips: int                # per slice
  topology_shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def topology(self) -> str:
    """The name the TPU compiler takes: 'v5p:4x4x8'."""
    return (f'{self.generation.slices.topology_prefix}:'
            f'{"x".join(map(str, self.topology_shape))}')

  @property
  def num_devices(self) -> int:
    return self.chips * self.num_slices

  @property
  def hosts(self) -> int:
    return self.num_slices * self.generation.slices.hosts(self.chips)

  def describe(self) -> str:
    slices = f'{self.num_slices} x ' if self.num_slices > 1 else ''
    return (f'{slices}{self.name} ({self.topology}, {self.chips} chips of '
            f'{describe_bytes(self.generation.hbm_per_device)})')


def describe_bytes(num_bytes: float) -> str:
  """'95 GiB', '15.8 GiB', '256 KiB'."""
  for unit, size in (('GiB', GIB), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if abs(num_bytes) >= size:
      return f'{num_bytes / size:.3g} {unit}'
  return f'{num_bytes:.0f} bytes'


def slice_names_example() -> str:
  """"'v4-32', 'v5p-256', 'v5litepod-16' (or 'v5e-16'), 'v6e-64'": a slice of each generation."""
  examples = []
  for generation in tpu_generations():
    rules = generation.slices
    count = rules.example.rpartition('-')[2]
    others = ' or '.join(f"'{prefix}-{count}'" for prefix in rules.prefixes[1:])
    examples.append(f"'{rules.example}'" + (f' (or {others})' if others else ''))
  return ', '.join(examples)


def slice_name_forms() -> str:
  """'v4-N, v5p-N, v5litepod-N or v5e-N, v6e-N': the names --compile_for takes."""
  return ', '.join(' or '.join(f'{prefix}-N' for prefix in generation.slices.prefixes)
                   for generation in tpu_generations())


def _generation_named(prefix: str) -> Accelerator | None:
  return next((generation for generation in tpu_generations()
               if prefix in generation.slices.prefixes), None)


def parse_slice(name: str, num_slices: int = 1) -> TpuSlice:
  """'v5p-256' -> its generation, chips and topology; ValueError naming what is wrong."""
  match = re.fullmatch(r'([a-z0-9]+)-(\d+)', name.strip())
  generation = _generation_named(match.group(1)) if match else None
  if not generation:
    raise ValueError(f'{name!r} is not a Cloud TPU slice name: give one such as '
                     f'{slice_names_example()}.')
  rules, prefix, count = generation.slices, match.group(1), int(match.group(2))
  chips = count // 2 if rules.name_counts_cores else count
  unit = 'TensorCores (2 per chip)' if rules.name_counts_cores else 'chips'
  if (rules.name_counts_cores and count % 2) or chips < rules.min_chips or (
      chips & (chips - 1)):
    smallest = rules.count_in_name(rules.min_chips)
    raise ValueError(
        f'{name!r}: {prefix} slices count {unit}, a power of two of at least '
        f'{smallest}, e.g. {prefix}-{smallest * 4}.')
  if chips > rules.max_chips:
    largest = rules.count_in_name(_largest_power_of_two(rules.max_chips))
    raise ValueError(
        f'{name!r} is larger than any {generation.name} slice: Cloud TPU offers at most '
        f'{rules.max_chips} chips, so {prefix}-{largest} at the most; for more, give '
        f'--num_slices.')
  if not 1 <= num_slices <= MAX_SLICES:
    raise ValueError(f'num_slices={num_slices}: give 1 to {MAX_SLICES} slices (the most the '
                     'TPU compiler takes).')
  return TpuSlice(name, generation, chips, torus_shape(chips, rules.torus_dims), num_slices)


def slice_names(generation: Accelerator, prefix: str | None = None,
                max_chips: int | None = None) -> list[str]:
  """Every slice of `generation` Cloud TPU offers (of at most `max_chips` chips), smallest
  first, named with `prefix` (default: Cloud TPU's own, 'v5litepod')."""
  rules = generation.slices
  prefix = prefix or rules.prefixes[0]
  names, chips = [], rules.min_chips
  while chips <= min(rules.max_chips, max_chips or rules.max_chips):
    if chips != 2:  # past one chip, the smallest torus is 2x2 (torus_shape)
      names.append(f'{prefix}-{rules.count_in_name(chips)}')
    chips *= 2
  return names


def _largest_power_of_two(limit: int) -> int:
  return 1 << (limit.bit_length() - 1)


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """Cloud TPU's shape for a slice of `chips` (a power of two): 2x2x1, 2x2x2, 2x2x4, 2x4x4,
  4x4x4, 4x4x8, ... in 3-D; 1x1, 2x2, 2x4, 4x4, 4x8, ... in 2-D: starting from 2x2, each
  doubling doubles the smallest side (the last of equal ones)."""
  if chips == 1:
    return (1,) * dims
  shape = [2, 2] + [1] * (dims - 2)
  while _product(shape) < chips:
    smallest = min(shape)
    last = max(i for i, side in enumerate(shape) if side == smallest)
    shape[last] *= 2
  if _product(shape) != chips:
    raise ValueError(f'No {dims}-D TPU topology of {chips} chips.')
  return tuple(shape)


def _product(shape) -> int:
  total = 1
  for side in shape:
    total *= side
  return total


def has_tpu_here() -> bool:
  """Whether this host has TPU chips (a TPU VM exposes them as /dev/accel* or /dev/vfio)."""
  return bool(glob.glob('/dev/accel*')) or os.path.isdir('/dev/vfio')


def quiet_libtpu_without_tpu() -> None:
  """With libtpu installed (the compile check's) on a host without TPU chips, JAX tries the
  TPU first and libtpu complains on stderr that it cannot find its workers; tell it, before
  JAX starts a backend, that it is on one host, so it gives up quietly, and that several
  processes may load it. A TPU VM is left alone."""
  if has_tpu_here():
    return
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-1')
  # libtpu lets one process at a time hold it (/tmp/libtpu_lockfile), for the chips' sake;
  # with no chips here, processes that only compile may share it.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


def topology_devices(tpu_slice: TpuSlice) -> list:
  """The devices of `tpu_slice`'s topology, to compile for (they run nothing). Needs the
  libtpu wheel (requirements-tpu-compile.txt)."""
  quiet_libtpu_without_tpu()
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental import topologies
  kwargs = {}
  if tpu_slice.generation.slices.chip_config:
    kwargs['chip_config_name'] = tpu_slice.generation.slices.chip_config
  if tpu_slice.num_slices > 1:
    kwargs['num_slices'] = tpu_slice.num_slices
  try:
    topology = topologies.get_topology_desc(topology_name=tpu_slice.topology, platform='tpu',
                                            **kwargs)
  except Exception as error:  # noqa: BLE001  (no libtpu: a RuntimeError or an ImportError)
    raise RuntimeError(
        f'Cannot describe {tpu_slice.describe()} to the TPU compiler ({type(error).__name__}: '
        f'{str(error)[:200]}). It needs the libtpu wheel: `make install-tpu-compile` (or '
        '`pip install -r requirements-tpu-compile.txt`).') from None
  return list(topology.devices)
