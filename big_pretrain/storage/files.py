"""Files of a run's workdir, which may be local or in a bucket (gs://..., as on TPU pods).

Orbax writes checkpoints through etils.epath; the run's other files (config,
results, images, the tokenizer copy) go through these functions, so they land
beside the checkpoints wherever those are. Plain `open` and `os.path.abspath`
would turn 'gs://b/run' into a local folder named 'gs:'.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from absl import logging
from etils import epath

from big_pretrain.errors import WorkdirError


def absolute(path: str) -> str:
  """A local path made absolute; a bucket URL (scheme://...) as it is."""
  return path if '://' in str(path) else os.path.abspath(path)


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` whole or not at all (a killed run leaves no half file)."""
  write_bytes(path, text.encode('utf-8'))


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, then renames it; creates the folder."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  temporary = target.parent / f'{target.name}.tmp'
  temporary.write_bytes(data)
  temporary.replace(target)


def read_json(path: str) -> dict | None:
  """The JSON object in `path`, or None if there is no such file."""
  text = read_text(path)
  return json.loads(text) if text is not None else None


def read_text(path: str) -> str | None:
  """The text in `path`, or None if there is no such file."""
  source = epath.Path(path)
  return source.read_text() if source.exists() else None


def is_dir(path: str) -> bool:
  return epath.Path(path).is_dir()


def list_dir(path: str) -> list[str]:
  """Names in folder `path`; [] if it does not exist."""
  folder = epath.Path(path)
  return sorted(child.name for child in folder.iterdir()) if folder.is_dir() else []


def check_usable(path: str) -> None:
  """Raises WorkdirError when a local `path` is a file or cannot be written; creates nothing.

  Checked before any device work. A bucket URL is left to its first write.
  """
  if '://' in str(path):
    return
  folder = os.path.abspath(path)
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise WorkdirError(f'--workdir={path} is a file, not a folder: give a folder (a new one '
                       'starts a run, an existing one resumes it).')
  existing = folder
  while not os.path.exists(existing):  # the run creates the missing folders below this one
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f'--workdir={path}: {existing} is a file, so the folder cannot be made.')
  if not _can_write_in(existing):
    raise WorkdirError(f'--workdir={path}: {existing} is not writable by this user: give a '
                       'folder this run can write checkpoints to.')


def _can_write_in(folder: str) -> bool:
  """Whether a file can be created in `folder` (tried for real: root ignores mode bits, but
  not a read-only mount)."""
  if not os.access(folder, os.W_OK | os.X_OK):
    return False
  probe = os.path.join(folder, f'.big_pretrain_write_test.{os.getpid()}')
  try:
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError:
    return False
  return True


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
  if take and '://' not in str(path):
    lock_path = os.path.join(os.path.abspath(path), LOCK_FILE)
    try:
      _acquire(lock_path, path)
    except WorkdirError as error:
      lock_path, refusal = None, str(error)
  try:
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
  with os.fdopen(descriptor, 'w') as lock_file:
    lock_file.write(text)
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
