"""Every accelerator the package knows, each once, in ACCELERATORS: what a JAX device of it
reports, its memory and dense matmul peaks, and for a Cloud TPU generation its bandwidths
and how its slices are named, laid out and booted.

Who reads the table: the MFU's peak (train/mfu.py), the memory a device that reports none
is taken to have (train/remat_choice.py, compile_for.py), the step's roofline
(train/roofline.py's Chip), Cloud TPU slices by name for --compile_for (tpu_slices.py, and
the slice names in cli.py's help and benchmarks/smallest_tpu_slice.py). launch/tpu_pod.sh
keeps its own case statements (it runs where the package is not installed);
tests/test_tpu_pod_launch.py checks them against every generation here.

Adding an accelerator is one entry in ACCELERATORS. A GPU has no slice rules: it has a peak
for the MFU and its memory, but --compile_for does not offer it.
"""

from __future__ import annotations

import dataclasses

from big_pretrain.registry import Registry

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class SliceRules:
  """How Cloud TPU names, lays out and boots the slices of one TPU generation."""
  prefixes: tuple[str, ...]    # of its slices' names, Cloud TPU's own first: ('v5litepod', 'v5e')
  example: str                 # a slice to name in messages: 'v5p-256'
  name_counts_cores: bool      # 'v5p-256' counts TensorCores (2 per chip), 'v6e-64' chips
  torus_dims: int              # 3: a 3-D torus (v4, v5p); 2: a 2-D one (v5e, v6e)
  topology_prefix: str         # the TPU compiler's name: 'v5p:4x4x4', 'v5e:4x4'
  max_chips: int               # the largest slice Cloud TPU offers, in chips
  runtime_version: str         # the TPU VM image launch/tpu_pod.sh creates its slices with
  chip_config: str | None = None  # libtpu's chip_config_name for one device per chip
  min_chips: int = 1
  chips_per_host: int = 4
  single_host_max_chips: int = 4  # a slice of up to this many chips is one host

  def count_in_name(self, chips: int) -> int:
    """The number a slice of `chips` chips has in its name: 'v5p-8' has 4 chips."""
    return chips * 2 if self.name_counts_cores else chips

  def hosts(self, chips: int) -> int:
    """The hosts (TPU VMs, one process each) of one slice of `chips` chips."""
    return 1 if chips <= self.single_host_max_chips else chips // self.chips_per_host


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One accelerator: a TPU generation or a GPU, per JAX device (a TPU v4 or later is one
  device per chip, megacore; a v2 or v3 chip is two devices, one per TensorCore)."""
  name: str                    # the table's key: 'v5p', 'h100_sxm'
  label: str                   # how reports name it: 'TPU v5p', 'NVIDIA H100 SXM'
  platform: str                # jax.Device.platform: 'tpu' or 'gpu'
  # jax.Device.device_kind of its devices, matched without regard to case or spaces.
  device_kinds: tuple[str, ...]
  hbm_per_device: int          # bytes (an L4's and a T4's memory is GDDR6)
  # Dense (no sparsity) matmul peaks in FLOP/s: bf16, and float32 at JAX's default precision
  # (one bf16 pass on a TPU's MXU, TF32 tensor cores on an A100/H100/H200).
  bf16_flops: float
  f32_flops: float
  peak_source: str
  # A GPU's device_kind carries its form factor and memory ('NVIDIA A100-SXM4-80GB'): a kind
  # that contains each of `kind_has` and none of `kind_lacks` is this one too (lower case,
  # in the kind with a space added at either end: ' l4 ' is the word, not 'l40s').
  kind_has: tuple[str, ...] = ()
  kind_lacks: tuple[str, ...] = ()
  # What a chip moves per second, for the step's roofline (train/roofline.py): HBM bytes;
  # bytes sent in a collective over the chips' links (ICI: a Pod's all-reduce bandwidth
  # over its chips, half the bidirectional ICI bandwidth); bytes sent to other slices over
  # the data-centre network (DCN). None: not published, or not read (GPUs).
  hbm_bandwidth: float | None = None
  ici_bandwidth: float | None = None
  dcn_bandwidth: float | None = None
  slices: SliceRules | None = None  # None: not a Cloud TPU generation --compile_for offers

  def matches(self, device_kind: str) -> bool:
    kind = _normalised(device_kind)
    if kind in {_normalised(known) for known in self.device_kinds}:
      return True
    padded = f' {kind} '
    return bool(self.kind_has) and all(part in padded for part in self.kind_has) and not any(
        part in padded for part in self.kind_lacks)


def _normalised(device_kind: str) -> str:
  return ' '.join(device_kind.lower().split())


_TPU_PER_CHIP_NOTE = 'a JAX device is one TensorCore, half a chip'

# TPUs, from Cloud TPU's documentation (cloud.google.com/tpu/docs/<generation>): bf16 peak,
# HBM per chip and its bandwidth; ICI: the Pod's all-reduce bandwidth over its chips (v4
# 1.1 PB/s over 4096, v5e 51.2 TB/s over 256, v6e 102.4 TB/s over 256; v5p: half its 1200
# GB/s bidirectional ICI, the same ratio); DCN per chip (v5p: 50 Gbps; v5e and v6e: the
# Pod's 6.4 and 25.6 Tbps over 256 chips; v4: none published); runtime versions from
# cloud.google.com/tpu/docs/runtimes (JAX images). And the largest slice: v4's Pod of 4096
# chips; v5e's and v6e's Pods of 256 chips (16x16); v5p's largest shape 16x16x24, 6144
# chips (of a Pod's 8960), so 4096 chips (v5p-8192) under the power-of-two rule. The TPU
# compiler describes larger topologies, and aborts the process on some of them (libtpu
# 0.0.42.1 on a v5e-512: 'Check failed: chip_bounds().y <= 16'). A v5e or v6e slice of up to
# 8 chips is one host (v5litepod-8: one VM of 8 chips). JAX's device_kind: 'TPU v4', 'TPU v5
# lite' (v5e), 'TPU v5' or 'TPU v5p' (v5p), 'TPU v6 lite' (v6e).
_TPUS = [
    Accelerator('v2', 'TPU v2', 'tpu', ('TPU v2',), 8 * GIB, 45e12 / 2, 45e12 / 2,
                f'cloud.google.com/tpu/docs/v2: 45 TFLOP/s per chip, {_TPU_PER_CHIP_NOTE}'),
    Accelerator('v3', 'TPU v3', 'tpu', ('TPU v3',), 16 * GIB, 123e12 / 2, 123e12 / 2,
                f'cloud.google.com/tpu/docs/v3: 123 TFLOP/s per chip, {_TPU_PER_CHIP_NOTE}'),
    Accelerator(
        'v4', 'TPU v4', 'tpu', ('TPU v4',), 32 * GIB, 275e12, 275e12,
        'cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16 per chip (megacore)',
        hbm_bandwidth=1200e9, ici_bandwidth=1.1e15 / 4096,
        slices=SliceRules(('v4',), 'v4-32', True, 3, 'v4', 4096, 'tpu-ubuntu2204-base',
                          chip_config='megacore', min_chips=4)),
    Accelerator(
        'v5p', 'TPU v5p', 'tpu', ('TPU v5', 'TPU v5p'), 95 * GIB, 459e12, 459e12,
        'cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16 per chip',
        hbm_bandwidth=2765e9, ici_bandwidth=1200e9 / 2, dcn_bandwidth=50e9 / 8,
        slices=SliceRules(('v5p',), 'v5p-256', True, 3, 'v5p', 6144, 'v2-alpha-tpuv5',
                          min_chips=4)),
    Accelerator(
        'v5e', 'TPU v5e', 'tpu', ('TPU v5 lite', 'TPU v5e', 'TPU v5litepod'), 16 * GIB, 197e12,
        197e12, 'cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16 per chip',
        hbm_bandwidth=819e9, ici_bandwidth=51.2e12 / 256, dcn_bandwidth=6.4e12 / 8 / 256,
        slices=SliceRules(('v5litepod', 'v5e'), 'v5litepod-16', False, 2, 'v5e', 256,
                          'v2-alpha-tpuv5-lite', single_host_max_chips=8)),
    Accelerator(
        'v6e', 'TPU v6e (Trillium)', 'tpu', ('TPU v6 lite', 'TPU v6e', 'TPU trillium'),
        32 * GIB, 918e12, 918e12, 'cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16 per chip',
        hbm_bandwidth=1638e9, ici_bandwidth=102.4e12 / 256, dcn_bandwidth=25.6e12 / 8 / 256,
        slices=SliceRules(('v6e',), 'v6e-64', False, 2, 'v6e', 256, 'v2-alpha-tpuv6e',
                          single_host_max_chips=8)),
]

# GPUs, from NVIDIA's datasheets, whose tensor-core peaks are "with sparsity": dense is half.
# H100 (nvidia.com/en-us/data-center/h100): SXM BF16 1979, TF32 989; PCIe 1513 / 756; NVL
#   1671 / 835 (sparse TFLOP/s); 80 GB, NVL 94 GB.
# H200 (nvidia.com/en-us/data-center/h200): SXM 1979 / 989; NVL 1671 / 835; 141 GB. A GH200's
#   device_kind ('NVIDIA GH200 480GB') contains 'h200': it is taken for an H200 SXM.
# A100: BF16 312, TF32 156 dense (SXM and PCIe); 40 GB or 80 GB.
# L4 (a Colab GPU): BF16 242, TF32 120 (sparse); 24 GB.
# T4 (Colab's free GPU): FP16 65 tensor-core TFLOP/s, FP32 8.1; 16 GB. It has no bf16 or TF32
#   tensor cores, so its bf16 peak is the FP16 one, an upper bound.
# Memory is the datasheet's GB, taken as GiB (what a program may allocate is a little less).
_GPUS = [
    Accelerator('h100_sxm', 'NVIDIA H100 SXM', 'gpu', ('NVIDIA H100 80GB HBM3',), 80 * GIB,
                1979e12 / 2, 989e12 / 2, 'NVIDIA H100 datasheet',
                kind_has=('h100',), kind_lacks=('pcie', 'nvl')),
    Accelerator('h100_pcie', 'NVIDIA H100 PCIe', 'gpu', ('NVIDIA H100 PCIe',), 80 * GIB,
                1513e12 / 2, 756e12 / 2, 'NVIDIA H100 datasheet', kind_has=('h100', 'pcie')),
    Accelerator('h100_nvl', 'NVIDIA H100 NVL', 'gpu', ('NVIDIA H100 NVL',), 94 * GIB,
                1671e12 / 2, 835e12 / 2, 'NVIDIA H100 datasheet',
                kind_has=('h100', 'nvl'), kind_lacks=('pcie',)),
    Accelerator('h200_sxm', 'NVIDIA H200 SXM', 'gpu', ('NVIDIA H200',), 141 * GIB,
                1979e12 / 2, 989e12 / 2, 'NVIDIA H200 datasheet',
                kind_has=('h200',), kind_lacks=('nvl',)),
    Accelerator('h200_nvl', 'NVIDIA H200 NVL', 'gpu', ('NVIDIA H200 NVL',), 141 * GIB,
                1671e12 / 2, 835e12 / 2, 'NVIDIA H200 datasheet', kind_has=('h200', 'nvl')),
    Accelerator('a100_40gb', 'NVIDIA A100', 'gpu',
                ('NVIDIA A100-SXM4-40GB', 'NVIDIA A100-PCIE-40GB'), 40 * GIB, 312e12, 156e12,
                'NVIDIA A100 datasheet', kind_has=('a100',), kind_lacks=('80gb',)),
    Accelerator('a100_80gb', 'NVIDIA A100', 'gpu',
                ('NVIDIA A100-SXM4-80GB', 'NVIDIA A100 80GB PCIe'), 80 * GIB, 312e12, 156e12,
                'NVIDIA A100 datasheet', kind_has=('a100', '80gb')),
    Accelerator('l4', 'NVIDIA L4', 'gpu', ('NVIDIA L4',), 24 * GIB, 242e12 / 2, 120e12 / 2,
                'NVIDIA L4 datasheet', kind_has=(' l4 ',)),
    Accelerator('t4', 'NVIDIA T4', 'gpu', ('Tesla T4',), 16 * GIB, 65e12, 8.1e12,
                'NVIDIA T4 datasheet (FP16 for bf16)', kind_has=(' t4 ',)),
]

ACCELERATORS = Registry('accelerator', _TPUS + _GPUS)


def of_device_kind(device_kind: str) -> Accelerator | None:
  """The accelerator of a `jax.Device.device_kind` ('TPU v5 lite' -> v5e, 'NVIDIA H100 80GB
  HBM3' -> h100_sxm), or None (a CPU, or one the table lacks)."""
  return next((entry for entry in ACCELERATORS if entry.matches(device_kind)), None)


def hbm_per_device(device_kind: str) -> int | None:
  """The memory of one device of this kind, from the table; None if not one it has."""
  accelerator = of_device_kind(device_kind)
  return accelerator.hbm_per_device if accelerator else None


def tpu_generations() -> list[Accelerator]:
  """The Cloud TPU generations whose slices --compile_for takes, in the table's order."""
  return [entry for entry in ACCELERATORS if entry.slices]
