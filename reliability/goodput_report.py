"""The end of reliability/kill_resume.py: the killed run's goodput as `python -m
big_pretrain.goodput WORKDIR` prints it, and the wall time it accounts for against the
attempts' wall times measured from outside (each attempt from launch to exit or kill)."""

from __future__ import annotations

import re
import subprocess
import sys

from reliability.processes import REPO

# big_pretrain/goodput.py's heading of each table: "mae: 5 starts, 123.4 s, goodput 45.6%".
_HEADING = re.compile(r'^(\S[^:]*): (\d+) starts?, ([\d.]+) s, goodput ([\d.]+)%')
ALL_STAGES = 'all stages'


def goodput_tables(workdir: str) -> tuple[int, str, dict[str, float]]:
  """(exit code, output, {table name: wall seconds}) of `python -m big_pretrain.goodput
  WORKDIR`, run by this interpreter from the repository."""
  done = subprocess.run([sys.executable, '-m', 'big_pretrain.goodput', workdir], cwd=REPO,
                        capture_output=True, text=True, check=False)
  walls = {}
  for line in done.stdout.splitlines():
    if match := _HEADING.match(line):
      walls[match.group(1)] = float(match.group(3))
  return done.returncode, (done.stdout + done.stderr).rstrip(), walls


def total_wall(walls: dict[str, float]) -> float | None:
  """The goodput's wall seconds over all stages: its 'all stages' table, or its one stage."""
  if ALL_STAGES in walls:
    return walls[ALL_STAGES]
  return sum(walls.values()) if walls else None


def wall_comparison(attempt_seconds: list[float], goodput_wall: float | None) -> str:
  measured = sum(attempt_seconds)
  line = (f'wall time of the killed run: {measured:.1f} s summed over its {len(attempt_seconds)} '
          f'attempts (launch to exit or kill, measured by kill_resume.py); ')
  if goodput_wall is None:
    return line + 'the goodput tables give none.'
  difference = 100 * (goodput_wall - measured) / measured if measured else float('nan')
  return (line + f'goodput wall_seconds over all stages: {goodput_wall:.1f} s; difference '
          f'{goodput_wall - measured:+.1f} s ({difference:+.1f}% of the attempts\' time)')
