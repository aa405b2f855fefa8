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
