"""How reliability/kill_resume.py launches each attempt: one plain main.py (its default), or,
with --process_counts, P processes of main.py over a fixed number of CPU devices, P drawn per
attempt from a seeded plan so that some restarts change the process count and some keep it."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import socket


@dataclasses.dataclass(frozen=True)
class Launch:
  """One attempt's processes. `processes` None: one plain main.py, no distributed flags and
  the environment as it is (kill_resume.py's default)."""
  processes: int | None = None
  devices: int | None = None  # in all, over the processes

  @property
  def plain(self) -> bool:
    return self.processes is None

  @property
  def devices_per_process(self) -> int | None:
    return None if self.plain else self.devices // self.processes

  def __str__(self) -> str:
    if self.plain:
      return '1 plain process'
    per = self.devices_per_process
    return (f'{self.processes} process{"es" if self.processes != 1 else ""} x '
            f'{per} device{"s" if per != 1 else ""}')


def change(before: Launch, after: Launch) -> str:
  return 'same' if before == after else f'{before} -> {after}'


def parse_counts(text: str) -> list[int]:
  """'1,2' -> [1, 2]; ValueError naming what is wrong."""
  try:
    counts = [int(part) for part in text.split(',') if part.strip()]
  except ValueError:
    raise ValueError(f'--process_counts={text}: give process counts like 1,2.') from None
  if not counts or any(count < 1 for count in counts):
    raise ValueError(f'--process_counts={text}: give process counts of at least 1, like 1,2.')
  return sorted(set(counts))


def plan_launches(seed: int, counts: list[int] | None, devices: int | None,
                  attempts: int) -> list[Launch]:
  """The launch of each attempt. Without `counts`: one plain process each. With them: the
  first attempt's count drawn from `counts`, and about half the restarts (at least one, and
  with two or more restarts at least one fewer than all) changing it to another of
  `counts`, the others keeping it. Its own random stream (seeded by `seed`): the kill
  schedule of a seed stays the one it always was."""
  if not counts:
    return [Launch()] * attempts
  rng = random.Random(f'process_counts:{seed}')
  restarts = attempts - 1
  if len(counts) == 1 or restarts == 0:
    return [Launch(counts[0], devices)] * attempts
  changes = set(rng.sample(range(restarts), max(1, restarts // 2) if restarts > 1 else 1))
  current = rng.choice(counts)
  plan = [current]
  for restart in range(restarts):
    if restart in changes:
      current = rng.choice([count for count in counts if count != current])
    plan.append(current)
  return [Launch(count, devices) for count in plan]


def reference_launch(counts: list[int] | None, devices: int | None) -> Launch:
  """The uninterrupted run: one process over every device (with the distributed flags, so it
  sums over devices with gloo as the multi-process attempts do), or one plain process."""
  return Launch(1, devices) if counts else Launch()


# --- Starting P processes of main.py on this machine.


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now (for a coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_args(launch: Launch, port: int, process_id: int) -> list[str]:
  """main.py's distributed flags for process `process_id` of `launch` (none for a plain one)."""
  if launch.plain:
    return []
  return [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={launch.processes}',
          f'--process_id={process_id}']


def process_env(launch: Launch, base: dict[str, str]) -> dict[str, str]:
  """`base` with JAX_NUM_CPU_DEVICES set to the devices of one process of `launch` and any
  --xla_force_host_platform_device_count removed (it would override it); `base` as it is
  for a plain launch."""
  env = dict(base)
  if launch.plain:
    return env
  env['JAX_NUM_CPU_DEVICES'] = str(launch.devices_per_process)
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                            env.get('XLA_FLAGS', '')).strip()
  return env


def default_env() -> dict[str, str]:
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1')
