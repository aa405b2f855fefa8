"""Cloud TPU slices by name, and what the TPU compiler needs to compile for one on any machine.

A slice's name is its Cloud TPU accelerator type: 'v4-32', 'v5p-256' (these
count TensorCores, two per chip), 'v5litepod-16' or 'v5e-16', 'v6e-64' (these
count chips). `parse_slice` turns one into its generation, chip count and the
topology the TPU compiler names ('v5p:4x4x8'); `topology_devices` gives that
topology's devices, from the libtpu wheel, on a host without a TPU: a program
can then be compiled for them (`jax.jit(...).lower(...).compile()`), and its
memory_analysis() says what one chip would hold. Nothing runs on them.

`GENERATIONS` holds each generation's memory per device (HBM), which a device
that does not report its memory (a topology's devices) is taken to have, and
its largest slice, beyond which `parse_slice` refuses a name.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """One TPU generation, as JAX sees it: one device per chip (v4 and v5p: megacore)."""
  name: str                    # 'v5p'
  device_kinds: tuple[str, ...]  # jax.Device.device_kind of its devices
  hbm_per_device: int          # bytes of HBM one device (chip) has
  name_counts_cores: bool      # 'v5p-256' counts TensorCores (2 per chip), 'v6e-64' chips
  torus_dims: int              # 3: a 3-D torus (v4, v5p); 2: a 2-D one (v5e, v6e)
  topology_prefix: str         # the compiler's name: 'v5p:4x4x4', 'v5e:4x4'
  max_chips: int               # the largest slice Cloud TPU offers, in chips
  chip_config: str | None = None  # libtpu's chip_config_name for one device per chip
  min_chips: int = 1
  chips_per_host: int = 4
  # What a chip moves per second, for the step's roofline (train/roofline.py): HBM bytes;
  # bytes sent in a collective over the chips' links (ICI: a Pod's all-reduce bandwidth
  # over its chips, half the bidirectional ICI bandwidth); bytes sent to other slices over
  # the data-centre network (DCN), None where Cloud TPU publishes no figure.
  hbm_bandwidth: float = 0.0
  ici_bandwidth: float = 0.0
  dcn_bandwidth: float | None = None


# Cloud TPU's documentation (cloud.google.com/tpu/docs/<generation>): HBM per chip and its
# bandwidth; ICI: the Pod's all-reduce bandwidth over its chips (v4 1.1 PB/s over 4096, v5e
# 51.2 TB/s over 256, v6e 102.4 TB/s over 256; v5p: half its 1200 GB/s bidirectional ICI,
# the same ratio); DCN per chip (v5p: 50 Gbps; v5e and v6e: the Pod's 6.4 and 25.6 Tbps
# over 256 chips; v4: none published). And the largest slice: v4's Pod of 4096 chips; v5e's
# and v6e's Pods of 256 chips (16x16); v5p's largest shape 16x16x24, 6144 chips (of a Pod's
# 8960), so 4096 chips (v5p-8192) under the power-of-two rule. The TPU compiler describes larger topologies, and aborts the process on
# some of them (libtpu 0.0.42.1 on a v5e-512: 'Check failed: chip_bounds().y <= 16').
GENERATIONS = {
    'v4': TpuGeneration('v4', ('TPU v4',), 32 * GIB, True, 3, 'v4', 4096, 'megacore',
                        min_chips=4, hbm_bandwidth=1200e9, ici_bandwidth=1.1e15 / 4096),
    'v5e': TpuGeneration('v5e', ('TPU v5 lite', 'TPU v5e'), 16 * GIB, False, 2, 'v5e', 256,
                         hbm_bandwidth=819e9, ici_bandwidth=51.2e12 / 256,
                         dcn_bandwidth=6.4e12 / 8 / 256),
    'v5p': TpuGeneration('v5p', ('TPU v5', 'TPU v5p'), 95 * GIB, True, 3, 'v5p', 6144,
                         min_chips=4, hbm_bandwidth=2765e9, ici_bandwidth=1200e9 / 2,
                         dcn_bandwidth=50e9 / 8),
    'v6e': TpuGeneration('v6e', ('TPU v6 lite', 'TPU v6e'), 32 * GIB, False, 2, 'v6e', 256,
                         hbm_bandwidth=1638e9, ici_bandwidth=102.4e12 / 256,
                         dcn_bandwidth=25.6e12 / 8 / 256),
}
_NAME_ALIASES = {'v5litepod': 'v5e'}
# Cloud TPU documents no limit on the slices of a Multislice; the TPU compiler of libtpu
# 0.0.42.1 aborts the process on 512 or more ('Check failed: NumSlices() < kMaxNumSlices').
MAX_SLICES = 511


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A slice (or `num_slices` identical slices, joined by the data-centre network)."""
  name: str                 # as asked for: 'v5p-256'
  generation: TpuGeneration
  chips: int                # per slice
  topology_shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def topology(self) -> str:
    """The name the TPU compiler takes: 'v5p:4x4x8'."""
    return f'{self.generation.topology_prefix}:{"x".join(map(str, self.topology_shape))}'

  @property
  def num_devices(self) -> int:
    return self.chips * self.num_slices

  @property
  def hosts(self) -> int:
    return max(1, self.num_devices // self.generation.chips_per_host)

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
  return "'v4-32', 'v5p-256', 'v5litepod-16' (or 'v5e-16'), 'v6e-64'"


def parse_slice(name: str, num_slices: int = 1) -> TpuSlice:
  """'v5p-256' -> its generation, chips and topology; ValueError naming what is wrong."""
  match = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)-(\d+)', name.strip())
  if not match:
    raise ValueError(f'{name!r} is not a Cloud TPU slice name: give one such as '
                     f'{slice_names_example()}.')
  generation = GENERATIONS[_NAME_ALIASES.get(match.group(1), match.group(1))]
  count = int(match.group(2))
  chips = count // 2 if generation.name_counts_cores else count
  unit = 'TensorCores (2 per chip)' if generation.name_counts_cores else 'chips'
  if (generation.name_counts_cores and count % 2) or chips < generation.min_chips or (
      chips & (chips - 1)):
    smallest = generation.min_chips * (2 if generation.name_counts_cores else 1)
    raise ValueError(
        f'{name!r}: {match.group(1)} slices count {unit}, a power of two of at least '
        f'{smallest}, e.g. {match.group(1)}-{smallest * 4}.')
  if chips > generation.max_chips:
    largest = _largest_power_of_two(generation.max_chips)
    count = largest * 2 if generation.name_counts_cores else largest
    raise ValueError(
        f'{name!r} is larger than any {generation.name} slice: Cloud TPU offers at most '
        f'{generation.max_chips} chips, so {match.group(1)}-{count} at the most; for more, give '
        f'--num_slices.')
  if not 1 <= num_slices <= MAX_SLICES:
    raise ValueError(f'num_slices={num_slices}: give 1 to {MAX_SLICES} slices (the most the '
                     'TPU compiler takes).')
  return TpuSlice(name, generation, chips, torus_shape(chips, generation.torus_dims),
                  num_slices)


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


def generation_of(device_kind: str) -> TpuGeneration | None:
  """The generation of a jax device_kind ('TPU v5 lite' -> v5e), or None."""
  for generation in GENERATIONS.values():
    if device_kind in generation.device_kinds:
      return generation
  return None


def hbm_per_device(device_kind: str) -> int | None:
  """The HBM bytes of one device of this kind, from GENERATIONS; None if not a TPU we know."""
  generation = generation_of(device_kind)
  return generation.hbm_per_device if generation else None


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
  if tpu_slice.generation.chip_config:
    kwargs['chip_config_name'] = tpu_slice.generation.chip_config
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
