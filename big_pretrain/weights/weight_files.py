"""Reading and writing weight files: safetensors (timm, Hugging Face), a PyTorch .pth and a
big_vision .npz, each into {name: numpy array}.

A file's first bytes are checked to be the format its name says before it is read: a
download that saved an HTML page, or a .pth renamed .safetensors, is named as what it is.
safetensors is read by safetensors_format.py (bfloat16 and float8 too); a .pth with
torch.load(weights_only=True): tensors and plain containers only, never a full unpickle, so
a file cannot run code (what else it holds is named by pytorch_pickle.py, which runs nothing
either). torch is needed for .pth files alone. Every floating array read is checked to be
finite: a NaN in imported weights would show up as a NaN loss at the first step. Every
failure is one line naming the file.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from typing import BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from safetensors import numpy as safetensors_numpy

from big_pretrain.errors import CheckpointUnreadableError, DamagedFileError, NonFiniteWeightsError
from big_pretrain.storage import files as storage
from big_pretrain.weights import pytorch_pickle, safetensors_format

SAFETENSORS_FILE = 'model.safetensors'
SAFETENSORS_INDEX_FILE = 'model.safetensors.index.json'  # a sharded model's
CONFIG_FILE = 'config.json'
PYTORCH_SUFFIXES = ('.pth', '.pt', '.bin')
SAFETENSORS, PYTORCH, NPZ = 'safetensors', 'PyTorch', 'npz'  # the formats read here
FORMAT_SUFFIXES = {SAFETENSORS: ('.safetensors',), PYTORCH: PYTORCH_SUFFIXES, NPZ: ('.npz',)}
_FORMAT_WORDS = {SAFETENSORS: 'a safetensors file', PYTORCH: 'a PyTorch checkpoint',
                 NPZ: 'a NumPy .npz archive'}
_SNIFFED_BYTES = 512  # enough for a zip's first member name, a text's first words
_ANSI_ESCAPE = re.compile(r'\x1b\[[0-9;?]*[ -/]*[@-~]')


def format_of_name(path: str) -> str | None:
  """SAFETENSORS, PYTORCH or NPZ, by the file's suffix; None for another suffix."""
  for fmt, suffixes in FORMAT_SUFFIXES.items():
    if path.endswith(suffixes):
      return fmt
  return None


def sniff(stream: BinaryIO) -> tuple[str | None, str | None]:
  """(SAFETENSORS, PYTORCH, NPZ or None; words for what the bytes are, None if nothing known)
  of the file `stream` reads, from its first bytes (and a zip's list of members); leaves the
  stream at its start."""
  head = stream.read(_SNIFFED_BYTES)
  stream.seek(0)
  if head.startswith(pytorch_pickle.ZIP_MAGIC):
    return _sniff_zip(stream)
  if head[:1] == b'\x80' and pytorch_pickle.LEGACY_MAGIC_NUMBER.to_bytes(10, 'little') in head:
    return PYTORCH, _FORMAT_WORDS[PYTORCH]  # the legacy format: pickles, the first this number
  length = int.from_bytes(head[:safetensors_format.HEADER_LENGTH_BYTES], 'little')
  if len(head) > safetensors_format.HEADER_LENGTH_BYTES and 1 < length < 2**32 and (
      head[safetensors_format.HEADER_LENGTH_BYTES:].startswith(b'{')):
    return SAFETENSORS, _FORMAT_WORDS[SAFETENSORS]
  if not head:
    return None, 'empty'
  if head.startswith(b'\x89HDF'):
    return None, 'an HDF5 file (Keras or TensorFlow weights)'
  if head.startswith(b'\x93NUMPY'):
    return None, 'a single NumPy .npy array'
  if head[:1] == b'\x80':
    return None, 'a Python pickle, not a PyTorch checkpoint'
  return None, _describe_text(head)


def _sniff_zip(stream: BinaryIO) -> tuple[str | None, str]:
  try:
    with zipfile.ZipFile(stream) as archive:
      names = archive.namelist()
  except (zipfile.BadZipFile, OSError, EOFError):
    return None, 'a zip archive cut short (the list of its members, at its end, is missing)'
  finally:
    stream.seek(0)
  if any(name == 'data.pkl' or name.endswith('/data.pkl') for name in names):
    return PYTORCH, _FORMAT_WORDS[PYTORCH]
  if names and all(name.endswith('.npy') for name in names):
    return NPZ, _FORMAT_WORDS[NPZ]
  return None, f'a zip archive of other files ({", ".join(names[:3]) or "none"})'


def _describe_text(head: bytes) -> str | None:
  text = head.decode('utf-8', errors='replace').strip()
  if text.startswith('version https://git-lfs'):
    return 'a Git LFS pointer, not the weights (git lfs pull fetches them)'
  if '<html' in text[:200].lower() or text.lower().startswith('<!doctype'):
    return 'an HTML page (a failed or redirected download?)'
  if text and all(char.isprintable() or char.isspace() for char in text):
    return f'text ({" ".join(text.split())[:60]!r})'
  return None


def check_format(path: str, stream: BinaryIO, expected: str) -> None:
  """Raises DamagedFileError if the bytes `stream` reads are another format than `expected`,
  or text, naming what they are and what to do. Bytes of no known kind pass: the reader of
  `expected` says what is wrong with them (a damaged header, say)."""
  fmt, what = sniff(stream)
  if fmt == expected or what is None:
    return
  fix = (f'rename it to end in {FORMAT_SUFFIXES[fmt][0]}' if fmt is not None
         else 'download or export it again')
  raise DamagedFileError(f'{path} is named as {_FORMAT_WORDS[expected]}, but its bytes are '
                         f'{what}: {fix}.')


def check_file(path: str) -> None:
  """The checks that need no tensor data, for a file named as one of the formats: its bytes
  are that format, a safetensors header is whole and consistent, a PyTorch checkpoint holds
  nothing but tensors. Reads the first bytes, the header, a .pth's pickle."""
  expected = format_of_name(path)
  try:
    with epath.Path(path).open('rb') as stream:
      check_format(path, stream, expected)
      if expected == SAFETENSORS:
        _safetensors_header(stream, path)
      elif expected == PYTORCH:
        _refuse_non_tensors(path, stream)
  except OSError as error:
    raise _unreadable(path, error) from error


def safetensors_names(path: str) -> list[str]:
  """The tensors' names of a .safetensors file, from its header (checked as check_file
  does); no tensor data is read."""
  try:
    with epath.Path(path).open('rb') as stream:
      check_format(path, stream, SAFETENSORS)
      return [entry.name for entry in _safetensors_header(stream, path)]
  except OSError as error:
    raise _unreadable(path, error) from error


def _safetensors_header(stream: BinaryIO, path: str) -> list[safetensors_format.Entry]:
  size = stream.seek(0, io.SEEK_END)
  stream.seek(0)
  return safetensors_format.read_header(stream, size, path)[0]


def read_weight_file(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a file, read as the format its name says (format_of_name)."""
  readers = {SAFETENSORS: read_safetensors, PYTORCH: read_pytorch, NPZ: read_npz}
  fmt = format_of_name(path)
  if fmt is None:
    raise ValueError(f'{path} is not named as a weight file read here (its name ends in none '
                     f'of {", ".join(sum(FORMAT_SUFFIXES.values(), ()))}).')
  return readers[fmt](path)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a .safetensors file (see safetensors_format.py for the dtypes)."""
  data = _read_bytes(path)
  check_format(path, io.BytesIO(data), SAFETENSORS)
  tensors = safetensors_format.read_tensors(data, path)
  check_finite(tensors, path)
  return tensors


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes float32 arrays, C-contiguous, with the metadata transformers asks for."""
  storage.write_bytes(path, safetensors_bytes(tensors))


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
                      ) -> bytes:
  """A safetensors file of `tensors` (C-contiguous), its metadata 'format': 'pt' (which
  transformers asks for) and `metadata`."""
  arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
  return _metadata_sorted(
      safetensors_numpy.save(arrays, metadata={'format': 'pt', **(metadata or {})}))


def _metadata_sorted(data: bytes) -> bytes:
  """`data` with its header's metadata keys in sorted order. The safetensors writer keeps
  them in a hash map, whose order changes from call to call: the same weights and metadata
  would give other bytes (and another file digest) at each export."""
  length = int.from_bytes(data[:8], 'little')
  header = data[8:8 + length].decode('utf-8')
  prefix = '{"__metadata__":'  # where the writer puts it, first
  if not header.startswith(prefix):
    return data
  metadata, end = json.JSONDecoder().raw_decode(header, len(prefix))
  ordered = json.dumps(dict(sorted(metadata.items())), separators=(',', ':'), ensure_ascii=False)
  if len(ordered) != end - len(prefix) or json.loads(ordered) != metadata:
    return data  # escaped differently from the writer's JSON: left as written
  header = prefix + ordered + header[end:]
  return data[:8] + header.encode('utf-8') + data[8 + length:]


def folder_weight_files(folder: str) -> list[str]:
  """The files holding the weights of a timm or Hugging Face model folder: model.safetensors,
  or the shards its model.safetensors.index.json lists, each there."""
  single = os.path.join(folder, SAFETENSORS_FILE)
  index = os.path.join(folder, SAFETENSORS_INDEX_FILE)
  if epath.Path(single).exists():
    return [single]
  if epath.Path(index).exists():
    weight_map = read_json_file(index).get('weight_map')
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(shard, str) for shard in weight_map.values())):
      raise DamagedFileError(f'{index} has no "weight_map" from tensor names to shard files: '
                             'restore it from the model it came with.')
    shards = sorted(set(weight_map.values()))
    missing = [shard for shard in shards if not epath.Path(folder, shard).exists()]
    if missing:
      raise CheckpointUnreadableError(
          f'{index} lists the shard {missing[0]!r}, which is not in {folder} ({len(missing)} '
          f'of its {len(shards)} shards are missing): download or copy it beside the index.')
    return [os.path.join(folder, shard) for shard in shards]
  others = [name for name in storage.list_dir(folder) if format_of_name(name)]
  raise CheckpointUnreadableError(
      f'{folder} holds no {SAFETENSORS_FILE} (nor {SAFETENSORS_INDEX_FILE}), where a timm or '
      'Hugging Face folder keeps its weights: '
      + (f'it has {", ".join(others[:3])}: point init_from.checkpoint at that file itself.'
         if others else 'copy them into it, or point init_from.checkpoint at the weights '
         'file itself.'))


def read_folder_weights(folder: str) -> dict[str, np.ndarray]:
  """The weights of a timm or Hugging Face model folder (see folder_weight_files)."""
  tensors = {}
  for path in folder_weight_files(folder):
    tensors.update(read_safetensors(path))
  return tensors


def read_json_file(path: str) -> dict:
  """The JSON object in `path` (a model's config.json, a shard index), or one line saying
  it is missing, unreadable or damaged."""
  try:
    recorded = storage.read_json(path, if_damaged='Restore it from the model it came with.')
  except OSError as error:
    raise _unreadable(path, error) from error
  if recorded is None:
    raise CheckpointUnreadableError(f'{path} is missing: copy it from the model it came with.')
  return recorded


def read_pytorch(path: str) -> dict[str, np.ndarray]:
  """A PyTorch checkpoint's tensors: the state dict itself, or the one under 'model' (the
  MAE reference's releases) or 'state_dict'. Tensors only: anything else in the file is
  refused, and named."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(
        f'Reading {path} needs PyTorch: pip install torch (CPU is enough), or convert the '
        'file to .safetensors first.') from error
  data = _read_bytes(path)
  check_format(path, io.BytesIO(data), PYTORCH)
  try:
    loaded = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  except Exception as error:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, ...)
    _refuse_non_tensors(path, io.BytesIO(data))
    refused = 'weights_only' in str(error) or 'Weights only' in str(error)
    raise DamagedFileError(
        f'{path} is not a readable PyTorch checkpoint ('
        + ("torch's tensors-only loader refuses it" if refused else _library_text(error))
        + '): it may be cut short or damaged; download it again.') from error
  state = loaded
  for key in ('model', 'state_dict'):
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
      break
  if not isinstance(state, dict):
    raise DamagedFileError(f'{path} holds a {type(state).__name__}, not a state dict of '
                           'tensors.')
  arrays, others = {}, []
  for name, value in state.items():
    if isinstance(value, torch.Tensor):
      value = value.detach()
      narrower_float = value.is_floating_point() and value.element_size() < 4
      arrays[name] = (value.float() if narrower_float else value).numpy()
    else:
      others.append(name)
  if not arrays:
    raise DamagedFileError(f'{path} holds no tensors in its state dict (it has {others[:5]}).')
  check_finite(arrays, path)
  return arrays


def _refuse_non_tensors(path: str, stream: BinaryIO) -> None:
  """DamagedFileError naming the entries of the checkpoint that are not tensors, if any."""
  entries = pytorch_pickle.non_tensor_entries(stream, path)
  if not entries:
    return
  named = ', '.join(f'{key!r} ({what})' if key else f'the whole file ({what})'
                    for key, what in entries[:3])
  more = f' and {len(entries) - 3} more' if len(entries) > 3 else ''
  raise DamagedFileError(
      f'{path} holds objects other than tensors: {named}{more}. This reads tensors only and '
      'runs nothing from a file: save just the state dict, in a session you trust (e.g. '
      "torch.save(checkpoint['model'], 'weights.pth')).")


def read_npz(path: str) -> dict[str, np.ndarray]:
  """A big_vision .npz: {'a/b/kernel': array}."""
  data = _read_bytes(path)
  check_format(path, io.BytesIO(data), NPZ)
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
      arrays = {name: np.asarray(archive[name]) for name in archive.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
    raise DamagedFileError(
        f'{path} is not a readable .npz ({_library_text(error)}): it may be cut short or '
        'damaged; download it again.') from error
  check_finite(arrays, path)
  return arrays


def check_finite(tree, where: str) -> None:
  """Raises NonFiniteWeightsError if a floating array of `tree` ({name: array}, or a nested
  tree of host arrays) holds NaN or Inf, naming the first (by name), how many of its values
  are, and `where` (the file or checkpoint the tree was read from)."""
  bad = []
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    values = np.asarray(leaf)
    if jnp.issubdtype(values.dtype, jnp.inexact) and not np.isfinite(values).all():
      bad.append((jax.tree_util.keystr(key_path, simple=True, separator='/'),
                  int(np.isnan(values).sum()), int(np.isinf(values).sum()), values.size))
  if bad:
    name, nans, infs, size = bad[0]
    more = f' (and {len(bad) - 1} more arrays have some)' if len(bad) > 1 else ''
    raise NonFiniteWeightsError(
        f'{where}: {name!r} holds {nans} NaN and {infs} Inf values of {size}{more}, which would '
        'make the first loss NaN: start from other weights (another file, or an earlier '
        'checkpoint).')


def _read_bytes(path: str) -> bytes:
  try:
    return epath.Path(path).read_bytes()
  except OSError as error:
    raise _unreadable(path, error) from error


def _unreadable(path: str, error: OSError) -> CheckpointUnreadableError:
  if isinstance(error, FileNotFoundError):
    return CheckpointUnreadableError(f'{path} does not exist: check the path.')
  return CheckpointUnreadableError(f'{path} cannot be read ({_library_text(error)}): check '
                                   'that it is a file this user may read.')


def _library_text(error: Exception) -> str:
  """A library's error as one short line of plain text (no colour codes)."""
  text = _ANSI_ESCAPE.sub('', str(error)).strip()
  line = text.splitlines()[0] if text else ''
  return f'{type(error).__name__}: {line}'[:200]
