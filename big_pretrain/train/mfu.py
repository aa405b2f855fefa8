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

Peaks: `peak_flops_per_device` reads the dense bf16 peak of a device's entry in
accelerators.ACCELERATORS (TPU v2-v6e, NVIDIA A100/H100/H200/L4/T4), and what a
float32 matmul runs at under JAX's default precision. On a CPU (or an unknown
device) measure instead, in the same run as the step it is compared to:
`measure_matmul_peak_flops`.

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

from big_pretrain import accelerators
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
  accelerator = accelerators.of_device_kind(getattr(device, 'device_kind', ''))
  if accelerator is None:
    return None
  name = _dtype_name(dtype)
  if name == 'bfloat16':
    return accelerator.bf16_flops
  if name == 'float32':
    precision = jax.config.jax_default_matmul_precision
    if precision not in (None, 'default'):
      return None
    return accelerator.f32_flops
  return None


def describe_peak(device, dtype='bfloat16') -> str:
  """'NVIDIA H100 SXM bfloat16: 989.5 TFLOP/s (NVIDIA H100 datasheet)', or why there is none."""
  accelerator = accelerators.of_device_kind(getattr(device, 'device_kind', ''))
  flops = peak_flops_per_device(device, dtype)
  if accelerator is None or flops is None:
    return f'no known peak for {getattr(device, "device_kind", device)!r} in {_dtype_name(dtype)}'
  return (f'{accelerator.label} {_dtype_name(dtype)}: {flops / 1e12:.1f} TFLOP/s '
          f'({accelerator.peak_source})')


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
