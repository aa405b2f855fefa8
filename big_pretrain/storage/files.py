"""Files of a run's workdir, which may be local or in a bucket (gs://..., as on TPU pods).

Orbax writes checkpoints through etils.epath; the run's other files (config,
results, images, the tokenizer copy) go through these functions, so they land
beside the checkpoints wherever those are. Plain `open` and `os.path.abspath`
would turn 'gs://b/run' into a local folder named 'gs:'.
"""

from __future__ import annotations

import json
import os

from absl import logging
from etils import epath

from big_pretrain.errors import DamagedFileError, WorkdirError


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


def read_json(path: str, *, if_damaged: str) -> dict | None:
  """The JSON object in `path`, or None if there is no such file.

  A file that is not one whole JSON object (cut short by a full disk, edited by hand) raises
  DamagedFileError naming it, followed by `if_damaged`: what the reader should do.
  """
  try:
    text = read_text(path)
    recorded = json.loads(text) if text is not None else None
  except (ValueError, UnicodeDecodeError) as error:  # json.JSONDecodeError is a ValueError
    raise DamagedFileError(f'{path} cannot be read ({_first_line(error)}). {if_damaged}'
                           ) from error
  if recorded is not None and not isinstance(recorded, dict):
    raise DamagedFileError(f'{path} holds a {type(recorded).__name__}, not the JSON object '
                           f'it should. {if_damaged}')
  return recorded


def read_json_or_set_aside(path: str, rebuilt: str, *, rename: bool) -> dict | None:
  """`read_json` for a file the run can rebuild: a damaged one reads as None, is renamed to
  *.damaged (when `rename`: one process of a run does it; nothing is deleted) and a warning
  names it, ending with `rebuilt`: how the run rebuilds it."""
  try:
    return read_json(path, if_damaged='')
  except DamagedFileError as error:
    if rename:
      kept = set_aside(path)
      logging.warning('%s Set aside as %s. %s', str(error).strip(), os.path.basename(kept),
                      rebuilt)
    return None


def set_aside(path: str) -> str:
  """Renames a damaged file to `<path>.damaged` (or .damaged.2, ...), keeping it for the
  user to inspect while the run rebuilds it; returns the new path."""
  source = epath.Path(path)
  target, n = epath.Path(f'{path}.damaged'), 1
  while target.exists():
    n += 1
    target = epath.Path(f'{path}.damaged.{n}')
  source.rename(target)
  return str(target)


def _first_line(error: Exception) -> str:
  return f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'


def read_text(path: str) -> str | None:
  """The text in `path`, or None if there is no such file."""
  source = epath.Path(path)
  return source.read_text() if source.exists() else None


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def is_dir(path: str) -> bool:
  return epath.Path(path).is_dir()


def list_dir(path: str) -> list[str]:
  """Names in folder `path`; [] if it does not exist."""
  folder = epath.Path(path)
  return sorted(child.name for child in folder.iterdir()) if folder.is_dir() else []


def check_usable(path: str) -> None:
  """Raises WorkdirError when a local workdir `path` is a file or cannot be written; creates
  nothing. Checked before any device work. A bucket URL is left to its first write."""
  check_writable_folder(path, '--workdir', 'give a folder this run can write checkpoints to '
                        '(a new one starts a run, an existing one resumes it)')


def check_writable_folder(path: str, flag: str, fix: str, *, replaced_whole: bool = False):
  """Raises WorkdirError, one line naming `flag`=`path` and ending with `fix`, when a local
  folder `path` is a file, cannot be made or cannot be written (tried for real); creates
  nothing. `replaced_whole`: the folder is written beside it and renamed into place, so the
  folder that holds it must be writable too. A bucket URL is left to its first write."""
  if is_bucket(path):
    return
  folder = os.path.abspath(path)
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise WorkdirError(f'{flag}={path} is a file, not a folder: {fix}.')
  written = [folder, os.path.dirname(folder)] if replaced_whole else [folder]
  for existing in dict.fromkeys(_nearest_existing(where) for where in written):
    if not os.path.isdir(existing):
      raise WorkdirError(f'{flag}={path}: {existing} is a file, so the folder cannot be made: '
                         f'{fix}.')
    if not _can_write_in(existing):
      raise WorkdirError(f'{flag}={path}: {existing} is not writable by this user: {fix}.')


def _nearest_existing(path: str) -> str:
  """`path`, or its nearest ancestor that exists (the missing folders are made below it)."""
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def remove(path: str) -> None:
  """Deletes the file `path` (local or in a bucket)."""
  epath.Path(path).unlink()


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
