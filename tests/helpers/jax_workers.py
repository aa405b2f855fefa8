"""Worker processes of a multi-process run on 127.0.0.1 (tests/multiprocess_worker.py)."""

import json
import os
import re
import socket
import time

import pytest

from helpers.paths import MULTIPROCESS_WORKER
from reliability.processes import ProcessGroup

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
LAUNCH_TIMEOUT_S = 240


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now (for a coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _worker_env(devices_per_process: int, extra: dict | None) -> dict:
  """This process's environment with `devices_per_process` CPU devices instead of 8."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices_per_process), **(extra or {}))
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                            env.get('XLA_FLAGS', ''))
  return env


def launch_workers(task: str, workdir: str, *, num_processes: int = NUM_PROCESSES,
                   devices_per_process: int = DEVICES_PER_PROCESS,
                   env: dict | None = None) -> list[dict]:
  """Runs TASK in `num_processes` worker processes of `devices_per_process` CPU devices each
  (`env` added to their environment); returns their results, by process id. Every worker
  starts JAX's distributed runtime with gloo collectives, also a single one.

  Every child is killed (its whole process group) if any fails or the launch
  runs out of time, so a hung collective cannot outlive the test.
  """
  port = free_port()
  logs, children = [], []
  try:
    for process_id in range(num_processes):
      log_path = os.path.join(workdir, f'{task}_process_{process_id}.log')
      logs.append(log_path)
      children.append(ProcessGroup(
          [str(process_id), str(num_processes), str(port), workdir, task], log_path,
          env=_worker_env(devices_per_process, env), script=MULTIPROCESS_WORKER))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while any(child.poll() is None for child in children):
      failed = [c for c in children if c.poll() not in (None, 0)]
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.2)
    codes = [child.poll() for child in children]
    if codes != [0] * num_processes:
      tails = '\n'.join(f'--- {path}\n' + open(path).read()[-3000:] for path in logs)
      pytest.fail(f'{task}: worker exit codes {codes} (None: timed out after '
                  f'{LAUNCH_TIMEOUT_S} s).\n{tails}')
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
  results = []
  for process_id in range(num_processes):
    with open(os.path.join(workdir, f'{task}_process_{process_id}.json')) as f:
      results.append(json.load(f))
  return results
