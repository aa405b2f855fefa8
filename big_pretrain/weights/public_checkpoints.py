"""A public checkpoint -> this project's parameter subtrees, for init_from.checkpoint.

The path is read by the one weight format of the table (FORMATS, weights/__init__.py) that
recognises it; weight_format.py has the contract. Nothing here names a format. Today's:

  timm        a timm model folder (config.json with "architecture", and model.safetensors or
              its shards and their index), or a .safetensors / .pth / .pt / .bin in timm's
              names: the MAE reference's releases ({'model': timm names, plus decoder_* and
              mask_token in the visualization ones}) are these
  hf          a Hugging Face model folder ("model_type"), or a file in transformers' names
  big_vision  a .npz

A folder without config.json, or a lone file, is told apart by its arrays' names. A .pth
is read tensors only (weights_only).

Each becomes {'encoder': ..., 'decoder': ... (MAE), 'fc_norm' / 'head': ... (a classifier)}
in our names and shapes (unrolled layers, numpy float32), fitted to `target`, the fresh
parameters of the stage: its heads, cls token and position embedding decide how to read. A
learned position embedding is taken as it is (and resampled to the stage's patch grid by
the caller, vit.fit_layout); for a stage with the fixed sin-cos embedding the checkpoint's
must be that same table, else the stage must learn one (model.posemb='learned'). Anything in
the checkpoint with no place in our ViT is named, never dropped silently.

check_public_checkpoint finds what can be found without reading the tensors (a missing
path, a file whose bytes are not the format its name says, a damaged safetensors header, a
.pth holding more than tensors, a folder without its weights), at config validation, before
any model is built; reading finds the rest (values that are NaN or Inf, shapes that do not fit).
"""

from __future__ import annotations

import os
from typing import NoReturn

import numpy as np
from etils import epath

from big_pretrain.errors import (CheckpointMismatchError, CheckpointUnreadableError,
                                 UserFacingError)
from big_pretrain.storage import files as storage
from big_pretrain.weights import FORMATS, weight_files
from big_pretrain.weights.weight_format import WeightFormat, WeightSource


def is_public_checkpoint(path: str) -> bool:
  """Whether `path` is read here rather than as an Orbax checkpoint (a folder of arrays): a
  file, a path with a weight file's suffix (so that a missing one is named as such), or a
  folder holding weight files or a shards' index, or one a format recognises (by its
  config.json)."""
  if path.endswith(_suffixes()):
    return True
  target = epath.Path(path)
  if not target.is_dir():
    return target.exists()
  if (any(name.endswith(_suffixes()) for name in storage.list_dir(path))
      or (target / weight_files.SAFETENSORS_INDEX_FILE).exists()):
    return True
  source = WeightSource(path)
  try:
    return any(weight_format.recognises(source) for weight_format in FORMATS)
  except UserFacingError:  # a damaged config.json: no model's that is known here
    return False


def check_public_checkpoint(path: str) -> None:
  """Raises the one-line error reading would for `path`, where finding it needs no tensor
  data (see the module doc); returns quietly for an Orbax checkpoint, which is checked where
  it is read."""
  if not epath.Path(path).exists():
    raise _missing(path)
  if not is_public_checkpoint(path):
    return
  source = WeightSource(path)
  if source.is_folder:
    format_of(source).check(source)
    return
  _check_known_suffix(path)
  if weight_files.format_of_name(path):
    weight_files.check_file(path)


def read_public_checkpoint(path: str, target: dict) -> dict:
  """{'encoder': ..., and 'decoder' / 'fc_norm' / 'head' where the checkpoint has them}
  in our names (see the module doc). `target`: the stage's fresh params (arrays or shapes)."""
  source = _existing(path)
  return format_of(source).read(source, target)


def read_state(path: str) -> tuple[str, dict[str, np.ndarray]]:
  """(the name of the format that reads `path`; its arrays by name, all finite)."""
  source = _existing(path)
  return format_of(source).name, source.arrays


def format_of(source: WeightSource) -> WeightFormat:
  """The one format of FORMATS that recognises `source`; else a one-line error saying what
  the path is not."""
  recognising = [weight_format for weight_format in FORMATS if weight_format.recognises(source)]
  if len(recognising) > 1:
    raise CheckpointMismatchError(
        f'{source.path} reads as {" and as ".join(f.title for f in recognising)} weights at '
        "once (by its config.json's keys or its arrays' names): keep only those of the format "
        'it is in.')
  if not recognising:
    _refuse_unrecognised(source)
  return recognising[0]


def _existing(path: str) -> WeightSource:
  if not epath.Path(path).exists():
    raise _missing(path)
  return WeightSource(path)


def _missing(path: str) -> CheckpointUnreadableError:
  return CheckpointUnreadableError(f'{path} does not exist: point init_from.checkpoint at a '
                                   'checkpoint file or folder.')


def _suffixes() -> tuple[str, ...]:
  """The ends of the names of every weight file a format reads."""
  return tuple(dict.fromkeys(suffix for weight_format in FORMATS
                             for suffix in weight_format.suffixes))


def _model_folder_formats() -> list[WeightFormat]:
  return [weight_format for weight_format in FORMATS if weight_format.config_key]


def _check_known_suffix(path: str) -> None:
  """A file no format reads by its name is refused, naming what its bytes are."""
  if path.endswith(_suffixes()):
    return
  with epath.Path(path).open('rb') as stream:
    sniffed, what = weight_files.sniff(stream)
  folders = ' or '.join(weight_format.title for weight_format in _model_folder_formats())
  fix = (f'rename it to end in {weight_files.FORMAT_SUFFIXES[sniffed][0]}' if sniffed else
         'init_from.checkpoint takes an Orbax step folder (or a folder of steps, or a stage '
         f'folder), a {folders} model folder, or a file ending in ' + ', '.join(_suffixes()))
  raise CheckpointMismatchError(f'{path}: unknown checkpoint format (its bytes are '
                                f"{what or 'of no kind known here'}): {fix}.")


def _refuse_unrecognised(source: WeightSource) -> NoReturn:
  """Raises what a path no format recognises is not, in one line."""
  path = source.path
  if source.is_folder:
    if source.config is not None:
      kinds = ' nor '.join(f'a {weight_format.title} config ("{weight_format.config_key}")'
                           for weight_format in _model_folder_formats())
      raise CheckpointMismatchError(
          f'{os.path.join(path, weight_files.CONFIG_FILE)} is neither {kinds}: restore the one '
          "the model came with, or move it away to have the weights' names tell the layout.")
    weight_files.folder_weight_files(path)  # raises: no weights where a model folder keeps them
  else:
    _check_known_suffix(path)
  named = (f': its arrays are named e.g. {source.names[:4]}'
           if source.is_folder or weight_files.format_of_name(path) else '')
  raise CheckpointMismatchError(
      f'{path} is in none of the weight formats read here '
      f'({", ".join(weight_format.title for weight_format in FORMATS)}){named}; point '
      'init_from.checkpoint at a ViT checkpoint in one of them.')
