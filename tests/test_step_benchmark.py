"""benchmarks/step_profile.py reads a profiler trace: the device's busy and idle time per step."""

import os
import sys

from helpers.paths import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, 'benchmarks'))

import step_profile as step_benchmark  # noqa: E402


def test_device_time_takes_the_union_of_kernels_over_streams():
  """Two steps on one GPU with two streams: kernels overlap across streams and leave gaps."""
  metadata = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
              {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}}]
  kernels = [  # (stream, name, start us, duration us)
      (10, 'gemm', 0, 40), (11, 'fusion', 30, 20), (10, 'gemm', 60, 30),   # step 1
      (10, 'gemm', 100, 40), (11, 'fusion', 130, 20), (10, 'gemm', 160, 40)]  # step 2
  events = metadata + [{'ph': 'X', 'pid': 1, 'tid': tid, 'name': name, 'ts': ts, 'dur': dur}
                       for tid, name, ts, dur in kernels]
  events.append({'ph': 'X', 'pid': 2, 'tid': 1, 'name': 'host work', 'ts': 0, 'dur': 500})
  found = step_benchmark.device_time(events, steps=2)
  # Busy: [0, 50) + [60, 90) + [100, 150) + [160, 200) = 170 us over 2 steps; span 200 us.
  assert found.busy_ms == 0.085 and found.span_ms == 0.1
  assert abs(found.idle_fraction - 0.15) < 1e-12
  assert found.launches == 3 and found.kernel_ms == {'gemm': 0.075, 'fusion': 0.02}
  assert step_benchmark.device_time(metadata[1:] + events[-1:], steps=2) is None  # a CPU trace
