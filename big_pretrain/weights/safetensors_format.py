"""The safetensors format, read here: the safetensors library's numpy reader has no bfloat16
or float8, and many public checkpoints ship in bfloat16.

A file is the header's length n (8 bytes, little-endian), n bytes of a JSON object
{name: {"dtype", "shape", "data_offsets": [begin, end]}} (plus an optional "__metadata__"),
then the tensors' little-endian bytes, offsets counted from the end of the header. All of it
is checked before a byte of data is trusted: the header lies within the file, each dtype is
known, each size is the product of the shape times the item size, and the tensors tile the
data in order, with no gap and no overlap (as the format requires: a file cannot hide other
content). A problem is one DamagedFileError naming the file and the tensor.

Floating tensors narrower than float32 come back as float32, exactly (every bfloat16,
float16 and float8 value is a float32 value); float64 and integer tensors as they are.
"""

from __future__ import annotations

import io
import json
import math
from typing import BinaryIO, NamedTuple

import ml_dtypes
import numpy as np
from etils import epath

from big_pretrain.errors import DamagedFileError

HEADER_LENGTH_BYTES = 8
MAX_METADATA_HEADER_BYTES = 1 << 24  # read_metadata reads no more of a header than this
# How each dtype's bytes are stored. bfloat16 is the top half of a float32's bits, so it is
# read as uint16 and widened by a shift: exact, whatever the host's byte order.
_STORED = {
    'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'),
    'BF16': np.dtype('<u2'),
    'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn), 'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
    'I64': np.dtype('<i8'), 'I32': np.dtype('<i4'), 'I16': np.dtype('<i2'),
    'I8': np.dtype('i1'), 'U8': np.dtype('u1'), 'BOOL': np.dtype('?'),
}
_WIDENED_TO_FLOAT32 = ('F16', 'F8_E4M3', 'F8_E5M2')


class Entry(NamedTuple):
  """One tensor of the header; `begin` and `end` are byte offsets into the data."""
  name: str
  dtype: str
  shape: tuple[int, ...]
  begin: int
  end: int


def read_header(stream: BinaryIO, file_size: int, path: str) -> tuple[list[Entry], int]:
  """(the header's tensors, where the data starts) of the file `stream` reads from its start,
  `file_size` bytes in all; reads the header alone."""
  if file_size < HEADER_LENGTH_BYTES:
    raise _damaged(path, f'it is {file_size} bytes, too short to hold the header length')
  length = int.from_bytes(stream.read(HEADER_LENGTH_BYTES), 'little')
  data_size = file_size - HEADER_LENGTH_BYTES - length
  if data_size < 0:
    raise _damaged(path, f'its header is {length} bytes long, but only '
                         f'{file_size - HEADER_LENGTH_BYTES} follow: it is cut short')
  try:
    header = json.loads(stream.read(length))
  except (ValueError, UnicodeDecodeError) as error:  # json.JSONDecodeError is a ValueError
    raise _damaged(path, f'its header is not JSON ({type(error).__name__})') from error
  if not isinstance(header, dict):
    raise _damaged(path, f'its header is a JSON {type(header).__name__}, not an object')
  entries = [_entry(name, fields, data_size, path)
             for name, fields in header.items() if name != '__metadata__']
  _check_tiling(entries, data_size, path)
  return entries, HEADER_LENGTH_BYTES + length


def read_metadata(path: str) -> dict:
  """The header's "__metadata__" of the file at `path` (who wrote it, in which format); {}
  for a file that is missing, damaged or has none: a hint, never a record to trust."""
  try:
    with epath.Path(path).open('rb') as stream:
      length = int.from_bytes(stream.read(HEADER_LENGTH_BYTES), 'little')
      header = json.loads(stream.read(min(length, MAX_METADATA_HEADER_BYTES)))
  except (OSError, ValueError):
    return {}
  metadata = header.get('__metadata__') if isinstance(header, dict) else None
  return metadata if isinstance(metadata, dict) else {}


def read_tensors(data: bytes, path: str) -> dict[str, np.ndarray]:
  """{name: array} of the whole file `data` (see the module doc for the dtypes)."""
  entries, data_start = read_header(io.BytesIO(data), len(data), path)
  tensors = {}
  for entry in entries:
    stored = _STORED[entry.dtype]
    raw = np.frombuffer(data, stored, count=math.prod(entry.shape),
                        offset=data_start + entry.begin).reshape(entry.shape)
    tensors[entry.name] = _decoded(raw, entry.dtype)
  return tensors


def _decoded(raw: np.ndarray, dtype: str) -> np.ndarray:
  """A copy of `raw` in host byte order, floats narrower than float32 widened to it."""
  if dtype == 'BF16':
    return (raw.astype(np.uint32) << 16).view(np.float32)
  if dtype in _WIDENED_TO_FLOAT32:
    return raw.astype(np.float32)
  return raw.astype(raw.dtype.newbyteorder('='))


def _entry(name: str, fields, data_size: int, path: str) -> Entry:
  """The header's entry for tensor `name`, each field checked."""
  if not isinstance(fields, dict):
    raise _damaged(path, f'tensor {name!r} is described by a {type(fields).__name__}, not an '
                         'object')
  dtype, shape, offsets = fields.get('dtype'), fields.get('shape'), fields.get('data_offsets')
  if dtype not in _STORED:
    raise _damaged(path, f'tensor {name!r} has dtype {dtype!r}, which this does not read (it '
                         f'reads {", ".join(_STORED)})',
                   fix='Convert the file to float32 or bfloat16 (e.g. with safetensors.torch)')
  if not (isinstance(shape, list) and all(_is_count(size) for size in shape)):
    raise _damaged(path, f'tensor {name!r} has shape {shape!r}, not a list of sizes')
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
          and offsets[0] <= offsets[1]):
    raise _damaged(path, f'tensor {name!r} has data_offsets {offsets!r}, not [begin, end]')
  begin, end = offsets
  if end > data_size:
    raise _damaged(path, f'tensor {name!r} ends at byte {end} of the data, which has '
                         f'{data_size}: the file is cut short')
  expected = math.prod(shape) * _STORED[dtype].itemsize
  if end - begin != expected:
    raise _damaged(path, f'tensor {name!r} has {end - begin} bytes, and its shape {shape} of '
                         f'{dtype} needs {expected}')
  return Entry(name, dtype, tuple(shape), begin, end)


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiling(entries: list[Entry], data_size: int, path: str) -> None:
  """The tensors cover the data exactly: in order, no gap, no overlap, nothing after."""
  position, previous = 0, None
  for entry in sorted(entries, key=lambda entry: (entry.begin, entry.end)):
    if entry.begin < position:
      raise _damaged(path, f'tensor {entry.name!r} (bytes {entry.begin}..{entry.end}) overlaps '
                           f'tensor {previous!r} (ending at byte {position})')
    if entry.begin > position:
      after = f'tensor {previous!r}' if previous is not None else 'the header'
      raise _damaged(path, f'bytes {position}..{entry.begin} of the data, between {after} and '
                           f'tensor {entry.name!r}, belong to no tensor')
    position, previous = entry.end, entry.name
  if position != data_size:
    raise _damaged(path, f'the last {data_size - position} bytes of the data belong to no '
                         'tensor')


def _damaged(path: str, problem: str, fix: str = 'It may be cut short or damaged: download or '
                                                  'export it again') -> DamagedFileError:
  return DamagedFileError(f'{path} is not a readable safetensors file: {problem}. {fix}.')
