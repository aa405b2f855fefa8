"""What the loop reports at each log step: the interval's mean metrics, images/s, steps/s,
model TFLOP/s per device and MFU, and the time left.

Step metrics stay on the device until a log or save step fetches them: no host sync per step.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from absl import logging

from big_pretrain.train import mfu as mfu_lib


@dataclasses.dataclass(frozen=True)
class SpeedReference:
  """What achieved FLOP/s are measured against: analytic model FLOPs and a peak."""
  flops_per_step: float
  peak_flops: float | None        # per device (per machine on CPU); None: unknown
  num_devices: int                # devices sharing flops_per_step (1 for a CPU machine)
  peak_description: str

  @classmethod
  def of(cls, config, mesh) -> SpeedReference:
    device = mesh.devices.flat[0]
    flops = mfu_lib.model_flops_per_step(config)
    if device.platform == 'cpu':
      # Fake CPU devices share the cores: the machine is the unit, and its
      # peak is a matmul measured now, in this process (~0.2 s).
      peak = mfu_lib.measure_matmul_peak_flops(config.model.dtype, size=1024, repeats=3,
                                               device=device)
      return cls(flops, peak, 1, f'CPU matmul peak measured now: {peak / 1e9:.1f} GFLOP/s')
    peak = mfu_lib.peak_flops_per_device(device, config.model.dtype)
    return cls(flops, peak, mesh.size, mfu_lib.describe_peak(device, config.model.dtype))

  def metrics(self, seconds_per_step: float) -> dict[str, float]:
    achieved = mfu_lib.achieved_flops_per_device(self.flops_per_step, seconds_per_step,
                                                 self.num_devices)
    metrics = {'model_tflops_per_sec_per_device': achieved / 1e12}
    if self.peak_flops:
      metrics['mfu'] = achieved / self.peak_flops
    return metrics


class LogInterval:
  """The step metrics since the last log step, on the device until `summarise` fetches them."""

  def __init__(self, speed: SpeedReference, batch_size: int, total_steps: int):
    self._speed = speed
    self._batch_size = batch_size
    self._total_steps = total_steps
    self.pending: list[dict] = []
    self._start = time.perf_counter()

  def add(self, metrics: dict) -> None:
    self.pending.append(metrics)

  def fetch(self) -> list[dict]:
    """The pending metrics on the host (a sync with the device)."""
    self.pending = jax.device_get(self.pending)
    return self.pending

  def summarise(self, step: int) -> dict[str, float]:
    """The interval's mean metrics and speeds; logs the time left; starts the next interval."""
    fetched = self.fetch()
    elapsed = time.perf_counter() - self._start
    summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    summary['images_per_sec'] = len(fetched) * self._batch_size / elapsed
    summary['steps_per_sec'] = len(fetched) / elapsed
    summary.update(self._speed.metrics(seconds_per_step=elapsed / len(fetched)))
    logging.info('Step %d of %d: %s to go at %.3g steps/s.', step, self._total_steps,
                 duration((self._total_steps - step) / summary['steps_per_sec']),
                 summary['steps_per_sec'])
    self.pending, self._start = [], time.perf_counter()
    return summary


def duration(seconds: float) -> str:
  """'1h 05m', '3m 20s', '12s'."""
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f'{seconds // 3600}h {seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m {seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'
