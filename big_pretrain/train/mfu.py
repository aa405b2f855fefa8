"""Model FLOPs utilisation: analytic FLOPs of a training step, device peaks, MFU.

MFU = model FLOPs per step / (seconds per step x devices x peak FLOP/s per device).

The model FLOPs are counted ANALYTICALLY from the config, never read from
XLA's cost analysis (which depends on the compiler's choices, counts
elementwise ops, and counts rematerialised forwards twice). The convention
(PaLM's appendix B, MaxText, levanter):

- Only matmuls count, 2 * m * n * k each: the patch embedding (a p x p
  stride-p convolution is a matmul over every patch), the attention q/k/v/out
  projections, the attention scores QK^T and the values AV (dense: a
  prefix-causal or padding mask does not remove them), the MLP's fc1/fc2, and
  each objective's heads. The models count their own (models/transformer.py,
  models/vit.py), and each objective the parts beyond the encoder
  (Objective.flops_beyond_encoder); this module adds them up. Layer norms, GELU, softmax, bias and position
  embedding adds, the loss, the optimizer update and embedding lookups (the
  text tower's token embedding is a gather) are not counted.
- A training step is 3 forwards: the backward of a matmul is two matmuls of
  the same size (gradient w.r.t. its input and w.r.t. its weight). This
  slightly over-counts the patch embedding, whose input gradient is never
  computed (the images are not parameters); that is under 1% of a ViT.
  A part that runs forward only (LiT's locked image tower, which gets no
  gradient) counts once.
- Rematerialisation's extra forward is NOT counted: it is work the hardware
  does (hardware FLOPs utilisation, HFU, would count it), not work the model
  needs, so remat lowers MFU, as it should.

Token counts follow the code: the ViT keeps the patches its objective keeps
(Objective.encoder_patches: `num_kept(L, r)` for MAE, and FLIP in training),
embeds only those and prepends the cls token when `model.use_cls_token`. (`model.patch_embed_impl='conv'`
embeds every patch before dropping some: extra work the model does not need,
not counted, as remat's.)

Peaks: `peak_flops_per_device` knows the dense bf16 peaks of TPU v2-v6e and
NVIDIA A100/H100/H200, and what a float32 matmul runs at under JAX's default
precision. On a CPU (or an unknown device) measure instead, in the same run as
the step it is compared to: `measure_matmul_peak_flops`.

CPU caveat: fake CPU devices (JAX_NUM_CPU_DEVICES or
--xla_force_host_platform_device_count) share the machine's cores. One device's
matmul measured alone uses all of them, so an MFU over N fake devices divides
by N machines' worth of peak and is understated N-fold. Benchmark on CPU with 1
device.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from big_pretrain.models import vit
from big_pretrain.objectives import objective_class

# A training step is this many forwards (forward + backward 2x); remat is not counted.
TRAIN_STEP_FORWARDS = 3


# --- Analytic model FLOPs ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Analytic matmul FLOPs of one training step for the global batch, per part.

  `forward` maps a part ('encoder/mlp', 'decoder/attention_scores', 'head', ...)
  to its forward FLOPs; the step does `TRAIN_STEP_FORWARDS` times as many,
  except for the `forward_only` parts, which it runs once.
  """
  forward: dict[str, float]
  # Parts that run forward only (prefixes of `forward`'s names): nothing in them
  # trains and no gradient passes through them (LiT's locked image tower, 'encoder/').
  forward_only: tuple[str, ...] = ()

  @property
  def forward_total(self) -> float:
    return float(sum(self.forward.values()))

  def step_flops(self, name: str) -> float:
    """A part's FLOPs in a training step: 3 forwards, or 1 where it runs forward only."""
    forwards = 1 if name.startswith(self.forward_only) else TRAIN_STEP_FORWARDS
    return forwards * self.forward[name]

  @property
  def train_step(self) -> float:
    return float(sum(self.step_flops(name) for name in self.forward))

  def format_table(self) -> str:
    """Each part's train-step TFLOPs and share of the step, largest first."""
    total = self.train_step
    lines = [f'{"part":<32} {"TFLOP/step":>12} {"share":>7}']
    for name in sorted(self.forward, key=lambda name: -self.step_flops(name)):
      flops = self.step_flops(name)
      lines.append(f'{name:<32} {flops / 1e12:12.4g} {flops / total:7.1%}')
    label = 'total (3 x forward)' if not self.forward_only else 'total (3 x fwd; locked 1 x)'
    lines.append(f'{label:<32} {self.train_step / 1e12:12.4g} {1:7.1%}')
    return '\n'.join(lines)


def encoder_num_tokens(config) -> int:
  """Tokens the ViT's blocks see per example in a training step: the patches the objective
  keeps (Objective.encoder_patches), plus the cls token."""
  return (objective_class(config.objective.name).encoder_patches(config)
          + int(config.model.use_cls_token))


def vit_forward_flops(config, batch: int, tokens: int | None = None) -> dict[str, float]:
  """The ViT encoder's forward: patch embedding of the patches the blocks see, blocks over
  `tokens` (default: the training step's, encoder_num_tokens)."""
  tokens = encoder_num_tokens(config) if tokens is None else tokens
  return vit.vit_forward_flops(config.model, batch, tokens - int(config.model.use_cls_token))


def model_flops_breakdown(config, num_labels: int | None = None) -> StepFlops:
  """Analytic FLOPs of one training step of a stage config, per part (see the module doc).

  The encoder's parts ('encoder/...') come from config.model and the tokens the objective
  keeps; every other part is the objective's own (Objective.flops_beyond_encoder). Reads
  config.batch_size, the GLOBAL batch. `num_labels`: the size of a head the data decides
  (WSP's label vocabulary, fine-tuning's classes) when known; else read from the config.
  """
  objective = objective_class(config.objective.name)
  encoder_tokens = encoder_num_tokens(config)
  parts = vit_forward_flops(config, config.batch_size, encoder_tokens)
  parts.update(objective.flops_beyond_encoder(config, encoder_tokens, num_labels))
  return StepFlops(parts, forward_only=objective.forward_only_parts)


def model_flops_per_step(config, num_labels: int | None = None) -> float:
  """Analytic model FLOPs of one training step (3 x forward, remat not counted)."""
  return model_flops_breakdown(config, num_labels).train_step


# --- Peaks ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DevicePeak:
  """Dense (no sparsity) matmul peaks of ONE JAX device, in FLOP/s."""
  name: str
  bfloat16: float
  # A float32 matmul at JAX's default precision: one bf16 pass on a TPU's MXU
  # (so the bf16 peak), TF32 tensor cores on an A100/H100/H200.
  float32_default_precision: float
  source: str


_TPU_PER_CHIP_NOTE = 'a JAX device is one TensorCore, half a chip'
# TPUs: JAX's device_kind is 'TPU v4', 'TPU v5 lite' (v5e), 'TPU v5' or 'TPU v5p'
# (v5p), 'TPU v6 lite' (v6e); v2/v3 chips have two TensorCores, each a device.
_TPU_PEAKS = {
    'v2': DevicePeak('TPU v2', 45e12 / 2, 45e12 / 2,
                     f'cloud.google.com/tpu/docs/v2: 45 TFLOP/s per chip, {_TPU_PER_CHIP_NOTE}'),
    'v3': DevicePeak('TPU v3', 123e12 / 2, 123e12 / 2,
                     f'cloud.google.com/tpu/docs/v3: 123 TFLOP/s per chip, {_TPU_PER_CHIP_NOTE}'),
    'v4': DevicePeak('TPU v4', 275e12, 275e12,
                     'cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16 per chip (megacore)'),
    'v5e': DevicePeak('TPU v5e', 197e12, 197e12,
                      'cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16 per chip'),
    'v5p': DevicePeak('TPU v5p', 459e12, 459e12,
                      'cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16 per chip'),
    'v6e': DevicePeak('TPU v6e (Trillium)', 918e12, 918e12,
                      'cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16 per chip'),
}
_TPU_GENERATIONS = {
    'v2': 'v2', 'v3': 'v3', 'v4': 'v4',
    'v5 lite': 'v5e', 'v5e': 'v5e', 'v5litepod': 'v5e',
    'v5': 'v5p', 'v5p': 'v5p',
    'v6 lite': 'v6e', 'v6e': 'v6e', 'trillium': 'v6e',
}
# NVIDIA datasheets list tensor-core peaks "with sparsity": dense is half.
# H100: nvidia.com/en-us/data-center/h100 (datasheet): SXM BF16 1979, TF32 989;
#   PCIe 1513 / 756; NVL 1671 / 835 (sparse TFLOP/s).
# H200: nvidia.com/en-us/data-center/h200 (datasheet): SXM 1979 / 989; NVL 1671 / 835.
# A100: nvidia A100 datasheet: BF16 312, TF32 156 dense (SXM and PCIe, 40 and 80 GB).
# L4 (a Colab GPU): nvidia L4 datasheet: BF16 242, TF32 120 (sparse).
# T4 (Colab's free GPU): nvidia T4 datasheet: FP16 65 tensor-core TFLOP/s, FP32 8.1; it
#   has no bf16 or TF32 tensor cores, so its 'bfloat16' entry is the FP16 peak, an upper bound.
_GPU_PEAKS = {
    'h100_sxm': DevicePeak('NVIDIA H100 SXM', 1979e12 / 2, 989e12 / 2, 'NVIDIA H100 datasheet'),
    'h100_pcie': DevicePeak('NVIDIA H100 PCIe', 1513e12 / 2, 756e12 / 2, 'NVIDIA H100 datasheet'),
    'h100_nvl': DevicePeak('NVIDIA H100 NVL', 1671e12 / 2, 835e12 / 2, 'NVIDIA H100 datasheet'),
    'h200_sxm': DevicePeak('NVIDIA H200 SXM', 1979e12 / 2, 989e12 / 2, 'NVIDIA H200 datasheet'),
    'h200_nvl': DevicePeak('NVIDIA H200 NVL', 1671e12 / 2, 835e12 / 2, 'NVIDIA H200 datasheet'),
    'a100': DevicePeak('NVIDIA A100', 312e12, 156e12, 'NVIDIA A100 datasheet'),
    'l4': DevicePeak('NVIDIA L4', 242e12 / 2, 120e12 / 2, 'NVIDIA L4 datasheet'),
    't4': DevicePeak('NVIDIA T4', 65e12, 8.1e12, 'NVIDIA T4 datasheet (FP16 for bf16)'),
}


def known_peak(device_kind: str) -> DevicePeak | None:
  """The peak entry for a `device.device_kind` string, or None if unknown (e.g. 'cpu').

  'TPU v5 lite' -> v5e, 'TPU v5'/'TPU v5p' -> v5p, 'TPU v6 lite' -> v6e;
  'NVIDIA H100 80GB HBM3' -> H100 SXM, 'NVIDIA H100 PCIe', 'NVIDIA H100 NVL',
  'NVIDIA H200', 'NVIDIA A100-SXM4-80GB', ...
  """
  kind = ' '.join(device_kind.lower().split())
  if kind.startswith('tpu'):
    generation = _TPU_GENERATIONS.get(kind[len('tpu'):].strip())
    return _TPU_PEAKS.get(generation) if generation else None
  if 'h100' in kind:
    return _GPU_PEAKS['h100_pcie' if 'pcie' in kind else 'h100_nvl' if 'nvl' in kind
                      else 'h100_sxm']
  if 'h200' in kind:
    return _GPU_PEAKS['h200_nvl' if 'nvl' in kind else 'h200_sxm']
  if 'a100' in kind:
    return _GPU_PEAKS['a100']
  for name in ('l4', 't4'):  # device_kind 'NVIDIA L4', 'Tesla T4'
    if name in kind.split():
      return _GPU_PEAKS[name]
  return None


def _dtype_name(dtype) -> str:
  name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  return {'bf16': 'bfloat16', 'f32': 'float32', 'fp32': 'float32'}.get(name, name)


def peak_flops_per_device(device, dtype='bfloat16') -> float | None:
  """Known dense matmul peak FLOP/s of `device` for matmuls in `dtype`, or None.

  `dtype` is the compute dtype (config.model.dtype): 'bfloat16' or 'float32'
  (float32 at JAX's default matmul precision; with jax_default_matmul_precision
  set to anything else the peak is unknown: None). None for CPUs and unknown
  devices: measure with `measure_matmul_peak_flops` instead.
  """
  peak = known_peak(getattr(device, 'device_kind', ''))
  if peak is None:
    return None
  name = _dtype_name(dtype)
  if name == 'bfloat16':
    return peak.bfloat16
  if name == 'float32':
    precision = jax.config.jax_default_matmul_precision
    if precision not in (None, 'default'):
      return None
    return peak.float32_default_precision
  return None


def describe_peak(device, dtype='bfloat16') -> str:
  """'NVIDIA H100 SXM bfloat16: 989.5 TFLOP/s (NVIDIA H100 datasheet)', or why there is none."""
  peak = known_peak(getattr(device, 'device_kind', ''))
  flops = peak_flops_per_device(device, dtype)
  if peak is None or flops is None:
    return f'no known peak for {getattr(device, "device_kind", device)!r} in {_dtype_name(dtype)}'
  return f'{peak.name} {_dtype_name(dtype)}: {flops / 1e12:.1f} TFLOP/s ({peak.source})'


def measure_matmul_peak_flops(dtype='float32', size: int | None = None, repeats: int = 5,
                              device=None) -> float:
  """Measured dense matmul FLOP/s of ONE device: a jitted (size x size) @ (size x size).

  Compiled and run once before timing; the median of `repeats` timed calls,
  each waited for with block_until_ready. Run it in the same process and at
  the same time as the step it is compared to (a shared machine's speed
  drifts). `size` defaults to 2048 on CPU and 8192 elsewhere. On CPU, one
  device's matmul uses every core: see the module doc on fake CPU devices.
  """
  device = jax.devices()[0] if device is None else device
  if size is None:
    size = 2048 if device.platform == 'cpu' else 8192
  rng = np.random.default_rng(0)
  a, b = (jax.device_put(jnp.asarray(rng.standard_normal((size, size), np.float32), dtype),
                         device) for _ in range(2))
  matmul = jax.jit(jnp.dot).lower(a, b).compile()
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2.0 * size ** 3 / statistics.median(times)


# --- MFU -----------------------------------------------------------------------

def achieved_flops_per_device(flops_per_step: float, seconds_per_step: float,
                              num_devices: int) -> float:
  return flops_per_step / seconds_per_step / num_devices


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int,
        peak_per_device: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak, in [0, 1]."""
  if seconds_per_step <= 0 or num_devices <= 0 or not peak_per_device or peak_per_device <= 0:
    raise ValueError(f'mfu needs positive seconds ({seconds_per_step}), devices ({num_devices}) '
                     f'and peak ({peak_per_device}).')
  return achieved_flops_per_device(flops_per_step, seconds_per_step, num_devices) / peak_per_device
