"""What a PyTorch checkpoint holds besides tensors, found without running anything in it.

torch.load(weights_only=True) refuses a file whose pickle names a global outside torch's
short list (tensors, their storages and dtypes, OrderedDict, ...), in words that read like
advice to load it with weights_only=False. To name the entry instead (`args`, an
argparse.Namespace, in the MAE reference's training checkpoints), the pickle is read here by
an unpickler that imports nothing and calls nothing: each global becomes a stand-in class
that records its name, each storage None, and the result is walked for stand-ins outside
torch's list.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from typing import BinaryIO

from big_pretrain.errors import DamagedFileError

# What torch's weights_only loader allows by default (torch/_weights_only_unpickler.py,
# _get_allowed_globals): torch's tensors, storages, dtypes, Size and device, and these.
_TORCH_MODULES = ('torch', 'torch._utils', 'torch._tensor', 'torch.nn.parameter',
                  'torch.serialization', 'torch.storage')
_ALLOWED_GLOBALS = ('collections.OrderedDict', 'collections.Counter', '_codecs.encode',
                    'builtins.bytearray', 'builtins.set', 'builtins.complex')
_CONTAINERS = ('collections.OrderedDict', 'collections.Counter', 'builtins.set')
# A legacy (pre-zip) checkpoint is pickles in a row: this number, the protocol, the system's
# byte order and sizes, then the object; a zip one holds the object in <name>/data.pkl.
LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
ZIP_MAGIC = b'PK\x03\x04'


class _StandIn:
  """What the pickle would build by calling its global (the subclass's `module`.`name`):
  here nothing is called; the arguments and state are kept, for the walk."""
  module = name = ''

  def __new__(cls, *args, **kwargs):
    made = super().__new__(cls)
    made.parts = [*args, kwargs]
    return made

  def __call__(self, *args, **kwargs):  # a pickle may call what a call returned
    return type(self)(*args, **kwargs)

  def __setstate__(self, state):  # BUILD
    self.parts.append(state)

  def __setitem__(self, key, value):  # SETITEMS into an OrderedDict
    self.parts.append({key: value})

  def append(self, value):  # APPENDS into a list-like
    self.parts.append([value])

  def extend(self, values):
    self.parts.append(list(values))


class _InertUnpickler(pickle.Unpickler):
  """Imports nothing, calls nothing of the file's: see the module doc."""

  def find_class(self, module, name):
    return type('StandIn', (_StandIn,), {'module': _one_line(module), 'name': _one_line(name)})

  def persistent_load(self, pid):  # a tensor's storage: its bytes are not read
    return None


def _one_line(text) -> str:
  """A name from the file, its control characters escaped: it goes into a one-line message."""
  return repr(str(text))[1:-1]


def non_tensor_entries(stream: BinaryIO, path: str) -> list[tuple[str, str]]:
  """(key path, 'module.name') of each entry of the checkpoint `stream` reads (zip or legacy
  format) that torch's weights_only loader refuses, in the file's order; key paths are
  joined by '/', '' for the file's top-level object. Raises DamagedFileError naming `path`
  if its pickle does not read."""
  try:
    root = _load(stream)
  except Exception as error:  # noqa: BLE001  (a damaged pickle raises any of a dozen types)
    raise DamagedFileError(f'{path} is not a readable PyTorch checkpoint: its pickle does not '
                           f'read ({type(error).__name__}). It may be cut short or damaged: '
                           'download it again.') from error
  return _outside_allowlist(root)


def _load(stream: BinaryIO):
  head = stream.read(len(ZIP_MAGIC))
  stream.seek(0)
  if head == ZIP_MAGIC:
    with zipfile.ZipFile(stream) as archive:
      pickles = [name for name in archive.namelist()
                 if name == 'data.pkl' or name.endswith('/data.pkl')]
      if not pickles:
        raise ValueError('no data.pkl')
      return _InertUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
  unpickler = _InertUnpickler(stream)
  if unpickler.load() != LEGACY_MAGIC_NUMBER:
    raise ValueError('no magic number')
  unpickler.load()  # the protocol version
  unpickler.load()  # the system's byte order and sizes
  return unpickler.load()


def _outside_allowlist(root) -> list[tuple[str, str]]:
  """The walk, depth first in the file's order; shared and cyclic containers once."""
  found, seen = [], set()
  stack = [((), root)]
  while stack:
    keys, node = stack.pop()
    if isinstance(node, (dict, list, tuple, set, frozenset, _StandIn)):
      if id(node) in seen:
        continue
      seen.add(id(node))
    children = []
    if isinstance(node, dict):
      children = [(keys + (key,), value) for key, value in node.items()]
    elif isinstance(node, (list, tuple, set, frozenset)):
      children = [(keys + (index,), value) for index, value in enumerate(node)]
    elif issubclass(_class_of(node), _StandIn):
      module, name = _class_of(node).module, _class_of(node).name
      if f'{module}.{name}' in _CONTAINERS and isinstance(node, _StandIn):
        children = [(keys, part) for part in node.parts]  # its contents, under its own key
      elif module not in _TORCH_MODULES and f'{module}.{name}' not in _ALLOWED_GLOBALS:
        found.append(('/'.join(map(str, keys)), f'{module}.{name}'))
    stack.extend(reversed(children))
  return found


def _class_of(node) -> type:
  return node if isinstance(node, type) else type(node)
