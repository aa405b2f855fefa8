"""Reading and writing weight files: safetensors (timm, Hugging Face), a PyTorch .pth and a
big_vision .npz, each into {name: numpy array}.

A .pth is read with torch.load(weights_only=True): tensors and plain containers only, never
a full unpickle, so a file cannot run code. torch is needed for .pth files alone; safetensors
and .npz need numpy and safetensors only. Every failure is one line naming the file.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from etils import epath
from safetensors import SafetensorError
from safetensors import numpy as safetensors_numpy

from big_pretrain.errors import DamagedFileError
from big_pretrain.storage import files as storage

SAFETENSORS_FILE = 'model.safetensors'
SAFETENSORS_INDEX_FILE = 'model.safetensors.index.json'  # a sharded model's
CONFIG_FILE = 'config.json'
PYTORCH_SUFFIXES = ('.pth', '.pt', '.bin')


def _read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a .safetensors file; a damaged or cut-short file is named in one line."""
  try:
    return dict(safetensors_numpy.load(_read_bytes(path)))
  except (SafetensorError, ValueError, OSError) as error:
    raise DamagedFileError(
        f'{path} is not a readable safetensors file ({_first_line(error)}): it may be cut '
        'short or damaged; download or export it again.') from error


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes float32 arrays, C-contiguous, with the metadata transformers asks for."""
  arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
  storage.write_bytes(path, safetensors_numpy.save(arrays, metadata={'format': 'pt'}))


def read_folder_weights(folder: str) -> dict[str, np.ndarray]:
  """The weights of a timm or Hugging Face model folder: model.safetensors, or the shards
  its model.safetensors.index.json lists."""
  single = os.path.join(folder, SAFETENSORS_FILE)
  index = os.path.join(folder, SAFETENSORS_INDEX_FILE)
  if epath.Path(single).exists():
    return read_safetensors(single)
  if epath.Path(index).exists():
    shards = sorted(set(read_json_file(index).get('weight_map', {}).values()))
    tensors = {}
    for shard in shards:
      tensors.update(read_safetensors(os.path.join(folder, shard)))
    return tensors
  raise FileNotFoundError(
      f'{folder} holds no {SAFETENSORS_FILE} (nor {SAFETENSORS_INDEX_FILE}): a timm or '
      'Hugging Face folder keeps its weights there. (A pytorch_model.bin folder: point at '
      'the .bin file itself, or save the model again with safe_serialization.)')


def read_json_file(path: str) -> dict:
  try:
    return json.loads(_read_bytes(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise DamagedFileError(f'{path} is not valid JSON ({_first_line(error)}): restore it '
                           'from the model it came with.') from error


def read_pytorch(path: str) -> dict[str, np.ndarray]:
  """A PyTorch checkpoint's tensors: the state dict itself, or the one under 'model' (the
  MAE reference's releases) or 'state_dict'. Tensors only: anything else in the file is
  refused by torch's weights_only loader, and named here."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(
        f'Reading {path} needs PyTorch: pip install torch (CPU is enough), or convert the '
        'file to .safetensors first.') from error
  try:
    loaded = torch.load(io.BytesIO(_read_bytes(path)), map_location='cpu', weights_only=True)
  except Exception as error:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, ...)
    if 'weights_only' in str(error) or 'Unsupported global' in str(error):
      raise DamagedFileError(
          f'{path} holds objects other than tensors ({_first_line(error)[:200]}), and this '
          'reads tensors only, never a full unpickle. Save just the state dict: '
          "torch.save(checkpoint['model'], 'weights.pth') in a session you trust.") from error
    raise DamagedFileError(
        f'{path} is not a readable PyTorch checkpoint ({_first_line(error)[:200]}): it may be '
        'cut short or damaged.') from error
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
      arrays[name] = value.detach().to(torch.float32).numpy()
    else:
      others.append(name)
  if not arrays:
    raise DamagedFileError(f'{path} holds no tensors in its state dict (it has {others[:5]}).')
  return arrays


def read_npz(path: str) -> dict[str, np.ndarray]:
  """A big_vision .npz: {'a/b/kernel': array}."""
  try:
    with np.load(io.BytesIO(_read_bytes(path)), allow_pickle=False) as data:
      return {name: np.asarray(data[name]) for name in data.files}
  except (ValueError, OSError, EOFError) as error:
    raise DamagedFileError(
        f'{path} is not a readable .npz ({_first_line(error)[:200]}): it may be cut short '
        'or damaged.') from error


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
