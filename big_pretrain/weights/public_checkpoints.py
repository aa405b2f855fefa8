"""A public checkpoint -> this project's parameter subtrees, for init_from.checkpoint.

Read, by what the path is:
  a folder with config.json and model.safetensors   timm ('architecture' in its config)
    (or its shards and their index)                 or Hugging Face ('model_type'); without
                                                    config.json, told apart by its keys
  a .safetensors file                               timm or HF names, told apart by its keys
  a .pth / .pt / .bin file                          the MAE reference's releases ({'model':
                                                    timm names, plus decoder_* and mask_token
                                                    in the visualization ones}), timm or HF
                                                    state dicts; tensors only (weights_only)
  a .npz file                                       big_vision

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

import jax
import ml_dtypes
import numpy as np
from absl import logging
from etils import epath

from big_pretrain.errors import (CheckpointMismatchError, CheckpointUnreadableError,
                                 UserFacingError)
from big_pretrain.models import transformer
from big_pretrain.models.patches import sincos_2d_position_embedding
from big_pretrain.models.vit import ENCODER, VIT_SIZES
from big_pretrain.storage import files as storage
from big_pretrain.weights import big_vision_layout, hf_layout, timm_layout, weight_files

SUFFIXES = ('.safetensors', '.npz') + weight_files.PYTORCH_SUFFIXES
# Entries a checkpoint may carry that our ViT does without, changing nothing it computes.
_IGNORED_PREFIXES = ('pooler.',)  # HF ViTModel's pooler (dense + tanh), outside the features
# Our sin-cos table and the MAE reference's are the same float64 formula rounded to float32;
# any other formula differs by O(1) somewhere. 1e-6 is 8 float32 ulps of 1.
SINCOS_TOLERANCE = 1e-6
# The 16-bit floats a checkpoint may store the table in, and half an ulp of each relative to
# the value (8 and 11 bits of significand).
_HALF_ULP = ((ml_dtypes.bfloat16, 2.0 ** -8), (np.float16, 2.0 ** -11))


def is_public_checkpoint(path: str) -> bool:
  """Whether `path` is read here rather than as an Orbax checkpoint (a folder of arrays): a
  file, a path with a weight file's suffix (so that a missing one is named as such), or a
  folder holding a model's weight files or a timm / Hugging Face config.json."""
  if path.endswith(SUFFIXES):
    return True
  target = epath.Path(path)
  if not target.is_dir():
    return target.exists()
  return (any(weight_files.format_of_name(name) for name in storage.list_dir(path))
          or (target / weight_files.SAFETENSORS_INDEX_FILE).exists()
          or _config_layout(path, damaged_ok=True) is not None)


def check_public_checkpoint(path: str) -> None:
  """Raises the one-line error `read_state` would for `path`, where finding it needs no
  tensor data (see the module doc); returns quietly for an Orbax checkpoint, which is
  checked where it is read."""
  if not epath.Path(path).exists():
    raise _missing(path)
  if not is_public_checkpoint(path):
    return
  if epath.Path(path).is_dir():
    _config_layout(path)
    files = weight_files.folder_weight_files(path)
  else:
    _check_known_format(path)
    files = [path]
  for file in files:
    weight_files.check_file(file)


def read_state(path: str) -> tuple[str, dict[str, np.ndarray]]:
  """(the layout: 'timm', 'hf' or 'big_vision'; the file's arrays by name, all finite)."""
  if not epath.Path(path).exists():
    raise _missing(path)
  if epath.Path(path).is_dir():
    layout = _config_layout(path)
    state = weight_files.read_folder_weights(path)
    if layout is not None:
      return layout, state
    logging.info('%s has no %s: telling timm weights from Hugging Face ones by their names.',
                 path, weight_files.CONFIG_FILE)
  else:
    fmt = _check_known_format(path)
    if fmt == weight_files.NPZ:
      return 'big_vision', weight_files.read_npz(path)
    state = (weight_files.read_safetensors(path) if fmt == weight_files.SAFETENSORS
             else weight_files.read_pytorch(path))
  return ('hf' if any(_is_hf_name(key) for key in state) else 'timm'), state


def _missing(path: str) -> CheckpointUnreadableError:
  return CheckpointUnreadableError(f'{path} does not exist: point init_from.checkpoint at a '
                                   'checkpoint file or folder.')


def _check_known_format(path: str) -> str:
  """The format a file's name says; an unknown suffix is refused, naming what its bytes are."""
  fmt = weight_files.format_of_name(path)
  if fmt is None:
    with epath.Path(path).open('rb') as stream:
      sniffed, what = weight_files.sniff(stream)
    fix = (f'rename it to end in {weight_files.FORMAT_SUFFIXES[sniffed][0]}' if sniffed else
           'init_from.checkpoint takes an Orbax step folder (or a folder of steps, or a stage '
           'folder), a timm or Hugging Face model folder, or a file ending in '
           + ', '.join(SUFFIXES))
    raise CheckpointMismatchError(f'{path}: unknown checkpoint format (its bytes are '
                                  f"{what or 'of no kind known here'}): {fix}.")
  return fmt


def _config_layout(folder: str, damaged_ok: bool = False) -> str | None:
  """'timm' or 'hf' by the folder's config.json; None if it has none, or (when `damaged_ok`,
  for telling folders apart) if it is damaged or of neither kind."""
  config_file = os.path.join(folder, weight_files.CONFIG_FILE)
  if not epath.Path(config_file).exists():
    return None
  try:
    config = weight_files.read_json_file(config_file)
  except UserFacingError:
    if damaged_ok:
      return None
    raise
  if 'model_type' in config:
    return 'hf'
  if 'architecture' in config:
    return 'timm'
  if damaged_ok:
    return None
  raise CheckpointMismatchError(
      f'{config_file} is neither a timm config ("architecture") nor a Hugging Face one '
      '("model_type"): restore the one the model came with, or move it away to have the '
      "weights' names tell the layout.")


def _is_hf_name(key: str) -> bool:
  key = key[len('vit.'):] if key.startswith('vit.') else key
  return key.startswith(('embeddings.', 'encoder.layer.', 'layers.', 'decoder.decoder'))


def read_public_checkpoint(path: str, target: dict) -> dict:
  """{'encoder': ..., and 'decoder' / 'fc_norm' / 'head' where the checkpoint has them}
  in our names (see the module doc). `target`: the stage's fresh params (arrays or shapes)."""
  layout, state = read_state(path)
  encoder_target = target[ENCODER]
  learned_posemb = 'pos_embedding' in encoder_target
  if layout == 'big_vision':
    parts, posemb = big_vision_layout.from_big_vision(state, path)
    kernel = parts[ENCODER]['patch_embed']['kernel']  # (p, p, C, D)
    check_size(depth_and_width(parts[ENCODER]), kernel.shape[0], encoder_target, path)
    if posemb is None:  # big_vision's sincos2d, computed for the stage's own grid
      if not learned_posemb:
        raise CheckpointMismatchError(
            f"{path} uses big_vision's fixed sincos2d position embedding, which is not the "
            "MAE sin-cos table this project computes: set model.posemb='learned' to start "
            'from it (its table is computed for the patch grid and learned from there).')
      rows, width = encoder_target['pos_embedding'].shape[1:]
      posemb = big_vision_layout.sincos2d(width, int(round(np.sqrt(rows))))
    _check_cls_token(ENCODER in parts and 'cls_token' in parts[ENCODER],
                     'cls_token' in encoder_target, path)
  else:
    if layout == 'hf':
      state = hf_layout.hf_to_timm(state)
    state = {key[len('module.'):] if key.startswith('module.') else key: value
             for key, value in state.items()}
    reader = timm_layout.StateReader(state, path)
    kernel = reader.take('patch_embed.proj.weight')  # (D, C, p, p)
    check_size((timm_layout.num_blocks(state), kernel.shape[0]), kernel.shape[-1],
               encoder_target, path)
    _check_cls_token('cls_token' in state, 'cls_token' in encoder_target, path)
    encoder, posemb = timm_layout.encoder_from_torch(
        reader, _heads(encoder_target), 'cls_token' in encoder_target)
    parts = {ENCODER: encoder, **timm_layout.head_from_torch(reader)}
    if 'decoder_embed.weight' in state and 'decoder' in target:
      parts['decoder'] = timm_layout.decoder_from_torch(reader, _heads(target['decoder']))
      decoder_posemb = reader.take('decoder_pos_embed')[0]
      _check_sincos(decoder_posemb[-_square_rows(decoder_posemb.shape[0]):],
                    'decoder_pos_embed', path, learnable=False)
    _check_nothing_left_over(reader, has_decoder='decoder' in target)
  if learned_posemb:
    parts[ENCODER]['pos_embedding'] = np.asarray(posemb, np.float32)[None]
  else:
    _check_sincos(posemb, 'position embedding', path, learnable=True)
  return parts


def _check_cls_token(has: bool, wants: bool, path: str) -> None:
  if has != wants:
    raise CheckpointMismatchError(
        f'{path} {"has" if has else "has no"} cls token, and this config sets '
        f'model.use_cls_token={wants}: set it to {has} (and model.pool to '
        f"{'cls' if has else 'gap'} or as the checkpoint was trained).")


def _heads(tower_target: dict) -> int:
  """The attention heads of a tower of `target`: its query kernels' (..., D, heads, hd)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tower_target):
    if jax.tree_util.keystr(path, simple=True, separator='/').endswith('attention/query/kernel'):
      return leaf.shape[-2]
  raise CheckpointMismatchError('the stage model has no attention layers to load into.')


def _square_rows(rows: int) -> int:
  """The patch rows of a (1 [+ 1], D) table: the largest square count it ends with."""
  return rows if int(round(np.sqrt(rows))) ** 2 == rows else rows - 1


def _check_sincos(posemb: np.ndarray, what: str, path: str, learnable: bool) -> None:
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


def _check_nothing_left_over(reader: timm_layout.StateReader, has_decoder: bool) -> None:
  left = [key for key in reader.left_over() if not key.startswith(_IGNORED_PREFIXES)]
  if not has_decoder:  # a MAE checkpoint's decoder, when the stage has none to take it
    left = [key for key in left if not key.startswith(('decoder', 'mask_token'))]
  if left:
    raise CheckpointMismatchError(
        f'{reader.source} has {len(left)} entries this ViT has no place for, e.g. '
        f'{left[:4]}: it is not a plain ViT (registers, layer scale or another pooling?) and '
        'would not load faithfully.')
  ignored = [key for key in reader.left_over() if key.startswith(_IGNORED_PREFIXES)]
  if ignored:
    logging.info('%s: not used (outside the encoder\'s features): %s', reader.source, ignored)


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
