"""Where a train step's device time goes: a profiler trace of a few steps, read back.

benchmarks/step_speed.py --profile traces each row's compiled step with
jax.profiler and prints the step's wall time, its time in device kernels, the
idle time between them and the top kernels (`device_time` reads the perfetto
trace; a CPU trace has no device kernels).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import time

import jax

PROFILED_STEPS = 3
# XLA runs a GPU step's kernels as command buffers (CUDA graphs) but turns them off while
# a profiler is attached, unless told otherwise: without this flag a profile shows the
# launch gaps that the untraced step does not have. It must be in XLA_FLAGS before JAX
# starts its backends (main() adds it first thing); timing is always done untraced.
PROFILE_WITH_COMMAND_BUFFERS = '--xla_enable_command_buffers_during_profiling=true'


def add_xla_flag(flag: str) -> None:
  """Appends `flag` to XLA_FLAGS (before JAX initializes a backend) unless it is set."""
  flags = os.environ.get('XLA_FLAGS', '')
  if flag.split('=')[0] not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {flag}'.strip()


@dataclasses.dataclass(frozen=True)
class DeviceTime:
  """Per step, from a trace of `steps` steps dispatched back to back (as the loop does)."""
  wall_ms: float          # traced wall time per step
  busy_ms: float          # time some kernel ran (the union over streams)
  span_ms: float          # first kernel start to last kernel end, per step
  launches: int           # kernel executions per step
  kernel_ms: collections.Counter  # per kernel name, summed over its executions

  @property
  def idle_fraction(self) -> float:
    """Of the traced device time, the part no kernel ran: launch gaps, host waits."""
    return 1.0 - self.busy_ms / self.span_ms if self.span_ms else 0.0


def device_time(events: list[dict], steps: int) -> DeviceTime | None:
  """DeviceTime of a perfetto trace's events; None when it has no device kernels (a CPU)."""
  process_names = {e['pid']: e.get('args', {}).get('name', '') for e in events
                   if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  device_pids = {pid for pid, process in process_names.items()
                 if any(kind in process for kind in ('GPU', 'TPU', '/device:'))}
  kernels = [e for e in events if e.get('ph') == 'X' and e.get('pid') in device_pids]
  if not kernels:
    return None
  kernel_us = collections.Counter()
  for event in kernels:
    kernel_us[event['name']] += event.get('dur', 0)
  # Kernels on several streams overlap: busy time is the union of their intervals.
  busy_us, covered_until = 0.0, float('-inf')
  for start, end in sorted((e['ts'], e['ts'] + e.get('dur', 0)) for e in kernels):
    if end > covered_until:
      busy_us += end - max(start, covered_until)
      covered_until = end
  span_us = max(e['ts'] + e.get('dur', 0) for e in kernels) - min(e['ts'] for e in kernels)
  return DeviceTime(
      wall_ms=float('nan'), busy_ms=busy_us / steps / 1e3, span_ms=span_us / steps / 1e3,
      launches=len(kernels) // steps,
      kernel_ms=collections.Counter({k: v / steps / 1e3 for k, v in kernel_us.items()}))


def profile_steps(name: str, compiled, state, batch, base_rng, directory: str):
  """Traces PROFILED_STEPS steps, prints where their device time went.

  Returns (state, metrics, DeviceTime or None)."""
  label = name.replace(' ', '_').replace('(', '').replace(')', '')
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f'hlo_{label}.txt'), 'w', encoding='utf-8') as file:
    file.write(compiled.as_text())
  trace_dir = os.path.join(directory, f'trace_{label}')
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  start = time.perf_counter()
  for _ in range(PROFILED_STEPS):  # dispatched back to back, as the loop does
    state, metrics = compiled(state, batch, base_rng)
  jax.block_until_ready((state, metrics))
  wall_ms = (time.perf_counter() - start) / PROFILED_STEPS * 1e3
  jax.profiler.stop_trace()
  traces = sorted(glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                            recursive=True))
  if not traces:
    print(f'  {name}: the profiler wrote no perfetto trace under {trace_dir}.')
    return state, metrics, None
  with gzip.open(traces[-1], 'rt', encoding='utf-8') as file:
    events = json.load(file)
  found = device_time(events['traceEvents'] if isinstance(events, dict) else events,
                      PROFILED_STEPS)
  if found is None:
    print(f'  {name}: {wall_ms:.1f} ms/step traced; no device kernels in the trace (a CPU run).')
    return state, metrics, None
  found = dataclasses.replace(found, wall_ms=wall_ms)
  print_kernel_times(name, found)
  return state, metrics, found


def print_kernel_times(name: str, found: DeviceTime, top: int = 25) -> None:
  print(f'  {name}: {found.wall_ms:.1f} ms/step traced, kernels busy {found.busy_ms:.1f} ms of '
        f'the {found.span_ms:.1f} ms from first to last kernel: {found.idle_fraction:.1%} idle; '
        f'{found.launches} kernel launches of {len(found.kernel_ms)} kernels per step. '
        f'Top {top}:')
  total = sum(found.kernel_ms.values())
  for kernel, milliseconds in found.kernel_ms.most_common(top):
    print(f'    {milliseconds:8.2f} ms {100 * milliseconds / total:5.1f}% {kernel[:110]}')
