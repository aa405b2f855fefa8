"""Files of a run's workdir, which may be local or in a bucket (gs://..., as on TPU pods).

Orbax writes checkpoints through etils.epath; the run's other files (config,
results, images, the tokenizer copy) go through these functions, so they land
beside the checkpoints wherever those are. Plain `open` and `os.path.abspath`
would turn 'gs://b/run' into a local folder named 'gs:'.
"""

from __future__ import annotations

import json
import os

from etils import epath

from big_pretrain.errors import WorkdirError


def is_bucket(path) -> bool:
  """A URL of an object store (gs://, s3://, ...): no local folder, no atomic create."""
  return '://' in str(path)


def absolute(path: str) -> str:
  """A local path made absolute; a bucket URL (scheme://...) as it is."""
  return path if is_bucket(path) else os.path.abspath(path)


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
  if is_bucket(path):
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
