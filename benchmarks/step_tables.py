"""The tables benchmarks/step_speed.py prints, and its rows as JSON (gpu_goals.py reads them).

Each describes rows measured by step_speed.run_rows_interleaved: `Row`, defined here so the
tables import nothing of the script that measures them.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from big_pretrain.models import transformer as transformer_lib
from big_pretrain.models import vit as vit_lib
from big_pretrain.train import mfu as mfu_lib
# Beside this script (its folder is on sys.path).
from step_profile import DeviceTime


@dataclasses.dataclass
class Row:
  objective: str
  config: object
  seconds: float
  compile_seconds: float
  memory_mib: float
  flops: mfu_lib.StepFlops
  peak: float
  loss: float
  attention: str  # the kernel each attention shape got (attention.AttentionPlan.summary)
  profile: DeviceTime | None = None  # with --profile on a GPU or TPU

  @property
  def images_per_second(self) -> float:
    return self.config.batch_size / self.seconds

  @property
  def tflops_per_device(self) -> float:
    return mfu_lib.achieved_flops_per_device(
        self.flops.train_step, self.seconds, self.config.mesh.data) / 1e12

  @property
  def mfu(self) -> float:
    return mfu_lib.mfu(self.flops.train_step, self.seconds, self.config.mesh.data, self.peak)


def print_table(header: list[str], rows: list[list[str]]) -> None:
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  print('| ' + ' | '.join(h.rjust(w) for h, w in zip(header, widths)) + ' |')
  print('|' + '|'.join('-' * (w + 1) + ':' for w in widths) + '|')
  for row in rows:
    print('| ' + ' | '.join(c.rjust(w) for c, w in zip(row, widths)) + ' |')
  print()


def describe_setup(args) -> str:
  device = jax.devices()[0]
  return (f'{device.platform} "{device.device_kind}" x{args.devices}, global batch '
          f'{args.batch_size}, {args.image_size} px, median of {args.steps} steps after '
          f'{args.warmup} warm-up')


def describe_peaks(args, rows: list[Row]) -> str:
  device = jax.devices()[0]
  if mfu_lib.peak_flops_per_device(device, args.dtype):
    return 'MFU vs ' + mfu_lib.describe_peak(device, args.dtype)
  size = 2048 if device.platform == 'cpu' else 8192
  return (f'MFU vs a {args.dtype} {size}x{size} matmul on {device}, measured just before and '
          'after each row\'s timed steps (the faster; column "device peak"); model FLOPs analytic, '
          '3 x forward, remat not counted')


def describe_remat(args, config) -> str:
  """The policy the row ran with; 'auto: dots' when --remat=auto chose it."""
  if args.remat == transformer_lib.REMAT_AUTO:
    return f'{transformer_lib.REMAT_AUTO}: {config.model.remat}'
  return config.model.remat


def describe_scan(config) -> str:
  """'scanned' or 'unrolled', as model.scan resolves for the variant's depth."""
  depth = vit_lib.parse_variant(config.model.variant).depth
  chosen = 'scanned' if vit_lib.scan_layers(config.model.scan, depth) else 'unrolled'
  return f'{vit_lib.SCAN_AUTO}: {chosen}' if config.model.scan == vit_lib.SCAN_AUTO else chosen


def fmt_tflop(value: float) -> str:
  return f'{value:.4g}'


def main_table(args, rows: list[Row]) -> None:
  print(f'\nTrain step per objective: {describe_setup(args)}')
  print(describe_peaks(args, rows) + '\n')
  header = ['objective', 'variant', 'dtype', 'scan', 'remat', 'attention', 'batch', 'ms/step',
            'images/s', 'model TFLOP/step', 'TFLOP/s/device', 'device peak TFLOP/s', 'MFU',
            'compile s', 'peak mem MiB/device']
  print_table(header, [[
      row.objective, row.config.model.variant, row.config.model.dtype,
      describe_scan(row.config), describe_remat(args, row.config),
      f'{args.attention}: {row.attention}',
      str(row.config.batch_size), f'{row.seconds * 1e3:.1f}', f'{row.images_per_second:.1f}',
      fmt_tflop(row.flops.train_step / 1e12), fmt_tflop(row.tflops_per_device),
      fmt_tflop(row.peak / 1e12), f'{row.mfu:.1%}', f'{row.compile_seconds:.1f}',
      f'{row.memory_mib:.0f}'] for row in rows])
  if args.breakdown:
    for row in rows:
      print(f'{row.objective}: model FLOPs per part\n{row.flops.format_table()}\n')


def write_json(args, rows: list[Row]) -> None:
  """Every row of every table: `objective` is the row's name ('mae', 'mae scan=True', ...),
  `objective_name` the objective it trains."""
  device = jax.devices()[0]
  with open(args.json, 'w', encoding='utf-8') as file:
    json.dump([dict(
        objective=row.objective, objective_name=row.config.objective.name,
        variant=row.config.model.variant,
        patch_embed_impl=row.config.model.get('patch_embed_impl', 'matmul'),
        device=f'{device.platform} {device.device_kind}', devices=args.devices,
        batch_size=row.config.batch_size, dtype=row.config.model.dtype,
        remat=row.config.model.remat, attention=row.attention, ms_per_step=row.seconds * 1e3,
        mfu=row.mfu, model_tflop_per_step=row.flops.train_step / 1e12,
        compile_seconds=row.compile_seconds, peak_memory_mib=row.memory_mib,
        scan=describe_scan(row.config), xla_flags=os.environ.get('XLA_FLAGS', ''),
        profile=None if row.profile is None else dict(
            traced_ms_per_step=row.profile.wall_ms, busy_ms=row.profile.busy_ms,
            span_ms=row.profile.span_ms, idle_fraction=row.profile.idle_fraction,
            launches=row.profile.launches, kernels=len(row.profile.kernel_ms)))
        for row in rows], file, indent=2)
