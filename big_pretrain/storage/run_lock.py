"""One run per workdir: process 0 holds WORKDIR/run.lock (host, pid, start time) while it runs."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from absl import logging

from big_pretrain.errors import WorkdirError
from big_pretrain.storage import files


LOCK_FILE = 'run.lock'


@contextlib.contextmanager
def run_lock(path: str, take: bool = True, agree=None):
  """Holds `path`/run.lock (host, pid, start time) while the run lasts: one run per workdir.

  A second run into the same workdir raises WorkdirError naming the first.
  A lock left by a dead process of this host is taken over with a warning;
  one of another host is not (its process cannot be checked from here).
  Released on any exit that runs Python's cleanup (an exception, SIGTERM,
  Ctrl-C); a SIGKILL leaves it, which is the stale case. Only process 0 of a
  run takes it (`take`); a bucket workdir has no atomic create, so no lock.
  `agree(refusal)`, called on every process of a run, returns process 0's refusal
  (a message or None), so that all of them stop, not process 0 alone while the
  others wait for it in their first collective.
  """
  lock_path = refusal = None
  try:  # from before the lock exists: a SIGTERM while it is taken still releases it
    if take and not files.is_bucket(path):
      lock_path = os.path.join(os.path.abspath(path), LOCK_FILE)
      try:
        _acquire(lock_path, path)
      except WorkdirError as error:
        lock_path, refusal = None, str(error)
    if agree is not None:
      shared = agree(refusal)
      refusal = refusal or (shared and f'Process 0 of this run stopped: {shared}')
    if refusal:
      raise WorkdirError(refusal)
    yield
  finally:
    if lock_path and (_read_lock(lock_path) or {}).get('pid') == os.getpid():
      os.remove(lock_path)


def _acquire(lock_path: str, path: str) -> None:
  """Creates `lock_path` naming this process; WorkdirError if a live run holds it."""
  os.makedirs(os.path.dirname(lock_path), exist_ok=True)
  mine = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
  while not _create_exclusively(lock_path, json.dumps(mine)):
    holder = _read_lock_being_written(lock_path)
    if holder is None:
      continue  # released between our two looks
    if not holder:
      raise WorkdirError(
          f'--workdir={path} has a lock file that names no run ({lock_path} is empty or '
          'damaged: a run killed as it started, or a file made by hand). If no run is '
          'using this workdir, delete it and run again.')
    if holder.get('host') == mine['host'] and not _is_alive(holder.get('pid')):
      logging.warning('Taking over %s: its run (pid %s, started %s) is no longer running.',
                      lock_path, holder.get('pid'), holder.get('started'))
      os.remove(lock_path)
      continue
    where = 'this host' if holder.get('host') == mine['host'] else f'host {holder.get("host")}'
    raise WorkdirError(
        f'--workdir={path} is in use by another run: pid {holder.get("pid")} on {where}, '
        f'started {holder.get("started")}. Stop that run or use another --workdir; if it '
        f'is no longer running, delete {lock_path} and run again.')


def _create_exclusively(path: str, text: str) -> bool:
  """Writes a new file at `path`; False if one exists (atomic: two runs cannot both win)."""
  try:
    descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  try:
    with os.fdopen(descriptor, 'w') as lock_file:
      lock_file.write(text)
  except BaseException:  # a signal while writing: no empty lock left behind
    os.remove(path)
    raise
  return True


def _read_lock(path: str) -> dict | None:
  try:
    with open(path) as lock_file:
      return json.loads(lock_file.read() or '{}')
  except FileNotFoundError:
    return None
  except ValueError:  # half written by a run killed at that instant
    return {}


def _read_lock_being_written(path: str, patience_s: float = 1.0) -> dict | None:
  """The lock at `path`, once its creator has written it (empty until then)."""
  deadline = time.monotonic() + patience_s
  holder = _read_lock(path)
  while holder == {} and time.monotonic() < deadline:
    time.sleep(0.05)
    holder = _read_lock(path)
  return holder


def _is_alive(pid) -> bool:
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True
