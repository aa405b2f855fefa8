"""The contract of a weight format, the entries of FORMATS (weights/__init__.py), and what
every format's reading and writing share.

A format (a WeightFormat) says:

  recognises(source)    whether the path it is given is in this format: by a folder's
                        config.json, the names of its arrays, a file's suffix; cheaply for a
                        folder (public_checkpoints.is_public_checkpoint asks it of any folder)
  read(source, target)  its weights as the stage's parameter subtrees ({'encoder': ..., and
                        'decoder' / 'fc_norm' / 'head' where it has them}: our names, numpy
                        float32), fitted to `target` (the stage's fresh parameters), with the
                        checks below; anything it cannot place is named, never dropped
  check(source)         for a folder it recognises: what can be found without reading the
                        tensors (at config validation, before any model is built; a lone
                        file is checked as its suffix's file format, weight_files.py)

and, where `can_write`:

  write(model, params, labels)  the stage's model (a StageModel, its parameters, its class
                        names) as the files of an export folder (an Exported); what the
                        format cannot express faithfully is refused in one line
                        (ExportRefusedError) naming the option, never written approximately
  holds_export(folder)  whether `folder` holds an export of ours in this format (so that
                        exporting it again needs no --overwrite)

public_checkpoints.py and export.py ask the table, never a format by its name: adding a
format is its module and one line in FORMATS. A WeightSource hands each format the path and
reads what they ask of it once (a folder's config.json, its arrays' names, the arrays).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import ml_dtypes
import numpy as np
from absl import logging
from etils import epath

from big_pretrain.errors import CheckpointMismatchError, ExportRefusedError
from big_pretrain.models import transformer
from big_pretrain.models.patches import sincos_2d_position_embedding
from big_pretrain.models.vit import ENCODER, VIT_SIZES
from big_pretrain.weights import weight_files

# model.safetensors' metadata key naming the format big_pretrain exported it in.
EXPORT_MARK = 'big_pretrain_export'
# Our sin-cos table and the MAE reference's are the same float64 formula rounded to float32;
# any other formula differs by O(1) somewhere. 1e-6 is 8 float32 ulps of 1.
SINCOS_TOLERANCE = 1e-6
# The 16-bit floats a checkpoint may store the table in, and half an ulp of each relative to
# the value (8 and 11 bits of significand).
_HALF_ULP = ((ml_dtypes.bfloat16, 2.0 ** -8), (np.float16, 2.0 ** -11))


class WeightSource:
  """A public checkpoint's path, and what the formats ask of it, each read once."""

  def __init__(self, path: str):
    self.path = path
    self.is_folder = epath.Path(path).is_dir()

  def holds(self, name: str) -> bool:
    """Whether the path is a folder holding `name`."""
    return self.is_folder and epath.Path(self.path, name).exists()

  @functools.cached_property
  def config(self) -> dict | None:
    """A folder's config.json (a timm or Hugging Face model's); None for a file or a folder
    without one. A damaged one is refused in one line."""
    if not self.holds(weight_files.CONFIG_FILE):
      return None
    return weight_files.read_json_file(os.path.join(self.path, weight_files.CONFIG_FILE))

  def holds_model_weights(self) -> bool:
    """Whether the folder keeps weights where a timm or Hugging Face model folder does."""
    return self.holds(weight_files.SAFETENSORS_FILE) or self.holds(
        weight_files.SAFETENSORS_INDEX_FILE)

  @functools.cached_property
  def names(self) -> list[str]:
    """The arrays' names: from the safetensors headers where the weights are safetensors (no
    tensor is read), else read with the arrays."""
    if self.is_folder:
      return [name for file in weight_files.folder_weight_files(self.path)
              for name in weight_files.safetensors_names(file)]
    if weight_files.format_of_name(self.path) == weight_files.SAFETENSORS:
      return weight_files.safetensors_names(self.path)
    return list(self.arrays)

  @functools.cached_property
  def arrays(self) -> dict[str, np.ndarray]:
    """{name: array}, every value finite: a model folder's model.safetensors (or its shards),
    or the file, read as the format its suffix says (weight_files.py)."""
    if not self.is_folder:
      return weight_files.read_weight_file(self.path)
    if self.config is None:
      logging.info('%s has no %s: telling timm weights from Hugging Face ones by their names.',
                   self.path, weight_files.CONFIG_FILE)
    return weight_files.read_folder_weights(self.path)


@dataclasses.dataclass(frozen=True)
class StageModel:
  """What an export needs to know of a stage: its ViT and what travels with it."""
  width: int
  depth: int
  heads: int
  patch_size: int
  image_size: int
  use_cls_token: bool
  pool: str
  posemb: str
  head: str | None           # 'single_label' / 'multi_label' / None
  decoder: dict | None       # MAE's decoder settings


@dataclasses.dataclass(frozen=True)
class Exported:
  """A stage's model written in a format: the whole of an export folder."""
  files: dict[str, bytes]    # file name -> its bytes
  model: str                 # what it loads as, for people: 'ViTMAEForPreTraining'
  arrays: int
  parameters: int


class WeightFormat:
  """One weight format (see the module doc). Subclasses set the attributes and implement
  recognises and read; a writable one write and holds_export too."""
  name: str = ''               # its key in FORMATS, and export's --format value
  title: str = ''              # for people: 'timm', 'Hugging Face'
  # The ends of the names of the weight files it reads: a path ending in one is public
  # weights (a missing one is named as such), a file ending in none is refused.
  suffixes: tuple[str, ...] = ()
  # The key of a model folder's config.json that says the folder is in this format (a
  # folder with a config.json no format's key is in is refused, naming them), or None.
  config_key: str | None = None
  can_write: bool = False
  export_files: tuple[str, ...] = ()  # every file its export writes, nothing else
  writes_decoder: bool = False  # its export holds MAE's decoder (read from the checkpoint)

  def recognises(self, source: WeightSource) -> bool:
    raise NotImplementedError

  def read(self, source: WeightSource, target: dict) -> dict:
    raise NotImplementedError

  def check(self, source: WeightSource) -> None:
    """For a folder it recognises: raises what is found without reading the tensors (by
    default nothing; a lone file's bytes are checked as the file format its name says,
    whatever the weight format)."""

  def write(self, model: StageModel, params: dict, labels: list[str] | None) -> Exported:
    raise ExportRefusedError(f'{self.title} weights are read here, not written: export in one '
                             'of the formats that are written (--format).')

  def holds_export(self, folder: str) -> bool:
    del folder
    return False

  def params_written(self, model: StageModel) -> list[str]:
    """The parameter subtrees its export of `model` is written from, if the stage has them
    (the export reads no others from the checkpoint)."""
    return [ENCODER] + (['fc_norm', 'head'] if model.head else []) + (
        ['decoder'] if model.decoder and self.writes_decoder else [])

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.name!r})'


def patch_position_embedding(model: StageModel, encoder: dict) -> np.ndarray:
  """The (L, D) table the encoder adds to its patches."""
  if model.posemb == 'learned':
    return np.asarray(encoder['pos_embedding'])[0]
  grid = model.image_size // model.patch_size
  return sincos_2d_position_embedding(model.width, grid, grid)


# --- What every format's read checks against the stage it starts.

def check_size(depth_and_width_there: tuple[int, int], patch: int, encoder_target: dict,
               path: str) -> None:
  """A checkpoint of another ViT size is named by its size, before anything is converted."""
  want = depth_and_width(encoder_target)
  if depth_and_width_there != want:
    depth, width = depth_and_width_there
    names = [f'{size}/{patch}' for size, (w, d, _) in VIT_SIZES.items() if (d, w) == (depth, width)]
    raise CheckpointMismatchError(
        f'{path} is a ViT of {depth} blocks of width {width}; the model of this config has '
        f'{want[0]} blocks of width {want[1]}: set model.variant to the checkpoint\'s size'
        + (f" ('{names[0]}')." if names else '.'))


def depth_and_width(encoder: dict) -> tuple[int, int]:
  """(blocks, width) of an encoder subtree in either layout (arrays or shapes)."""
  stack = encoder[transformer.TOWER_STACK]
  if transformer.SCANNED_BLOCKS in stack:
    depth = jax.tree_util.tree_leaves(stack[transformer.SCANNED_BLOCKS])[0].shape[0]
  else:
    depth = sum(1 for key in stack if key.startswith('block_'))
  return depth, encoder['patch_embed']['kernel'].shape[-1]


def check_cls_token(has: bool, wants: bool, path: str) -> None:
  if has != wants:
    raise CheckpointMismatchError(
        f'{path} {"has" if has else "has no"} cls token, and this config sets '
        f'model.use_cls_token={wants}: set it to {has} (and model.pool to '
        f"{'cls' if has else 'gap'} or as the checkpoint was trained).")


def attention_heads(tower_target: dict) -> int:
  """The attention heads of a tower of `target`: its query kernels' (..., D, heads, hd)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tower_target):
    if jax.tree_util.keystr(path, simple=True, separator='/').endswith('attention/query/kernel'):
      return leaf.shape[-2]
  raise CheckpointMismatchError('the stage model has no attention layers to load into.')


def place_position_embedding(parts: dict, posemb: np.ndarray, encoder_target: dict,
                             path: str) -> dict:
  """`parts` with the checkpoint's (L, D) patch position table where the stage learns one;
  where the stage computes the fixed sin-cos one, the table must be that one."""
  if 'pos_embedding' in encoder_target:
    parts[ENCODER]['pos_embedding'] = np.asarray(posemb, np.float32)[None]
  else:
    check_sincos(posemb, 'position embedding', path, learnable=True)
  return parts


def check_sincos(posemb: np.ndarray, what: str, path: str, learnable: bool) -> None:
  """A checkpoint's patch position table must be our fixed sin-cos one where we compute it."""
  rows, width = posemb.shape
  grid = int(round(np.sqrt(rows)))
  if grid * grid != rows:
    raise CheckpointMismatchError(f'{path}: its {what} has {rows} rows, not a square patch grid.')
  expected = sincos_2d_position_embedding(width, grid, grid)
  difference = np.abs(np.asarray(posemb, np.float64) - expected)
  if np.any(difference > _sincos_tolerance(posemb, expected)):
    difference = float(np.max(difference))
    fix = ("set model.posemb='learned' to start from it" if learnable else
           'this decoder cannot take it')
    raise CheckpointMismatchError(
        f"{path}: its {what} is not the fixed sin-cos table this config's model computes "
        f'(they differ by up to {difference:.3g}): {fix}.')


def _sincos_tolerance(posemb: np.ndarray, expected: np.ndarray):
  """How far a checkpoint's copy of the sin-cos table may be from ours: SINCOS_TOLERANCE, and
  where the file stored it in a 16-bit float (every value representable in it: a bf16 or
  f16 checkpoint), half an ulp of that float more (round to nearest: at most 2^-8 of each
  value in bfloat16, 2^-11 in float16; f16's subnormals are closer than SINCOS_TOLERANCE)."""
  for narrow, half_ulp in _HALF_ULP:
    if np.array_equal(np.asarray(posemb, np.float32).astype(narrow).astype(np.float32), posemb):
      return SINCOS_TOLERANCE + half_ulp * np.abs(expected)
  return SINCOS_TOLERANCE
