"""A Python script (main.py unless told otherwise) in its own process group, its output in a file.

A new session makes the script and every process it starts one group: a signal reaches all of
them, as a terminal's Ctrl-C or a scheduler's notice does, and a kill at the time limit leaves
no child behind (an input worker, a process waiting in a collective). Output goes to a log
file, not a pipe, so a chatty run cannot block on a full pipe, and a caller can follow the log
while the run goes on.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

# Run from anywhere: main.py lives at the repository root.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, 'main.py')


@dataclasses.dataclass
class Run:
  """One finished (or stopped) process."""
  args: list[str]       # the script's arguments
  rc: int | None        # None: still running at its time limit, then killed
  output: str           # stdout and stderr, as written
  seconds: float

  @property
  def timed_out(self) -> bool:
    return self.rc is None


def command(args: list[str], script: str = MAIN) -> list[str]:
  """How `script` with `args` is started: by this interpreter. A script named `-m module`
  runs that module (python -m big_pretrain.export)."""
  return [sys.executable, *(['-m', script[3:]] if script.startswith('-m ') else [script]), *args]


class ProcessGroup:
  """`script` with `args`, started in a new session, stdout and stderr into `log_path`."""

  def __init__(self, args: list[str], log_path: str, *, env: dict[str, str] | None = None,
               script: str = MAIN, cwd: str = REPO):
    self.args = list(args)
    self.log_path = log_path
    self.started = time.monotonic()
    with open(log_path, 'wb') as log:  # the child writes through its own copy
      self.popen = subprocess.Popen(command(self.args, script), cwd=cwd, env=env,
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

  def elapsed(self) -> float:
    return time.monotonic() - self.started

  def poll(self) -> int | None:
    return self.popen.poll()

  def signal(self, signum: int) -> None:
    """`signum` to the whole group; a group whose processes are all gone is left be."""
    try:
      os.killpg(self.popen.pid, signum)
    except ProcessLookupError:
      pass

  def kill(self) -> None:
    """SIGKILL to the whole group, so no child survives; returns once the script is gone."""
    self.signal(signal.SIGKILL)
    self.popen.wait()

  def wait(self, timeout: float) -> int | None:
    """The exit code, waiting until `timeout` seconds after the start (and at least 1 s);
    None if it was still running then, and was killed."""
    try:
      return self.popen.wait(timeout=max(timeout - self.elapsed(), 1))
    except subprocess.TimeoutExpired:
      self.kill()
      return None

  def output(self) -> str:
    with open(self.log_path, errors='replace') as log:
      return log.read()

  def finish(self, timeout: float) -> Run:
    """Waits as `wait` does; the run with its output."""
    rc = self.wait(timeout)
    return Run(self.args, rc, self.output(), self.elapsed())
