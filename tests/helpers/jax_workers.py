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


def _worker_env() -> dict:
  """This process's environment with DEVICES_PER_PROCESS CPU devices instead of 8."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(DEVICES_PER_PROCESS))
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                            env.get('XLA_FLAGS', ''))
  return env


def launch_workers(task: str, workdir: str) -> list[dict]:
  """Runs TASK in NUM_PROCESSES worker processes; returns their results, by process id.

  Every child is killed (its whole process group) if any fails or the launch
  runs out of time, so a hung collective cannot outlive the test.
  """
  port = free_port()
  logs, children = [], []
  try:
    for process_id in range(NUM_PROCESSES):
      log_path = os.path.join(workdir, f'{task}_process_{process_id}.log')
      logs.append(log_path)
      children.append(ProcessGroup(
          [str(process_id), str(NUM_PROCESSES), str(port), workdir, task], log_path,
          env=_worker_env(), script=MULTIPROCESS_WORKER))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while any(child.poll() is None for child in children):
      failed = [c for c in children if c.poll() not in (None, 0)]
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.2)
    codes = [child.poll() for child in children]
    if codes != [0] * NUM_PROCESSES:
      tails = '\n'.join(f'--- {path}\n' + open(path).read()[-3000:] for path in logs)
      pytest.fail(f'{task}: worker exit codes {codes} (None: timed out after '
                  f'{LAUNCH_TIMEOUT_S} s).\n{tails}')
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
  results = []
  for process_id in range(NUM_PROCESSES):
    with open(os.path.join(workdir, f'{task}_process_{process_id}.json')) as f:
      results.append(json.load(f))
  return results
