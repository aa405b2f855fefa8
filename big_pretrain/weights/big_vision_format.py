"""big_vision's ViT checkpoints (.npz, '/'-joined names), read (not written).

big_vision's ViT is ours in flax with other module names, the same kernel shapes:

  big_vision                                   ours
  embedding/{kernel,bias}                      patch_embed/{kernel,bias}
  cls, pos_embedding (1, L, D)                 cls_token, pos_embedding
  Transformer/encoderblock_i/LayerNorm_0, _1   transformer/block_i/norm1, norm2
    MultiHeadDotProductAttention_0/{query,key,value,out}   attention/{...}
    MlpBlock_0/Dense_0, Dense_1                mlp/fc1, fc2
  Transformer/encoderblock/... (scanned: leading layer axis)  the same, per layer
  Transformer/encoder_norm                     transformer/norm
  head                                         head

Its fixed 'sincos2d' position embedding is not stored; it is computed here, by big_vision's
formula, which is not MAE's: such a checkpoint starts a stage whose model.posemb is
'learned'. A model whose pooling has parameters (MAP head) or a pre-logits layer is refused.
"""

from __future__ import annotations

import re

import numpy as np

from big_pretrain.errors import CheckpointMismatchError
from big_pretrain.models import transformer
from big_pretrain.models.vit import ENCODER
from big_pretrain.weights import weight_files
from big_pretrain.weights.weight_format import (WeightFormat, WeightSource, check_cls_token,
                                                check_size, depth_and_width,
                                                place_position_embedding)


class BigVisionFormat(WeightFormat):
  name = 'big_vision'
  title = 'big_vision'
  suffixes = weight_files.FORMAT_SUFFIXES[weight_files.NPZ]

  def recognises(self, source: WeightSource) -> bool:
    return not source.is_folder and source.path.endswith(self.suffixes)

  def read(self, source: WeightSource, target: dict) -> dict:
    path, encoder_target = source.path, target[ENCODER]
    parts, posemb = from_big_vision(source.arrays, path)
    kernel = parts[ENCODER]['patch_embed']['kernel']  # (p, p, C, D)
    check_size(depth_and_width(parts[ENCODER]), kernel.shape[0], encoder_target, path)
    if posemb is None:  # big_vision's sincos2d, computed for the stage's own grid
      if 'pos_embedding' not in encoder_target:
        raise CheckpointMismatchError(
            f"{path} uses big_vision's fixed sincos2d position embedding, which is not the "
            "MAE sin-cos table this project computes: set model.posemb='learned' to start "
            'from it (its table is computed for the patch grid and learned from there).')
      rows, width = encoder_target['pos_embedding'].shape[1:]
      posemb = sincos2d(width, int(round(np.sqrt(rows))))
    check_cls_token(ENCODER in parts and 'cls_token' in parts[ENCODER],
                    'cls_token' in encoder_target, path)
    return place_position_embedding(parts, posemb, encoder_target, path)


_BLOCK_RENAMES = {
    'LayerNorm_0': 'norm1', 'LayerNorm_1': 'norm2',
    'MultiHeadDotProductAttention_0': 'attention',
    'MlpBlock_0/Dense_0': 'mlp/fc1', 'MlpBlock_0/Dense_1': 'mlp/fc2',
}
_REFUSED = ('MAPHead_0', 'pre_logits')


def image_tower_prefix(names) -> str:
  """The prefix of the image ViT's names: '' or 'params/' or 'params/img/' (SigLIP/LiT)."""
  prefixes = sorted((name[:-len('embedding/kernel')] for name in names
                     if name == 'embedding/kernel' or name.endswith('/embedding/kernel')), key=len)
  if not prefixes:
    raise CheckpointMismatchError('no embedding/kernel: not a big_vision ViT checkpoint.')
  return prefixes[0]


def _nest(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('/')
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return tree


def sincos2d(width: int, grid: int, temperature: float = 10_000.) -> np.ndarray:
  """big_vision's posemb_sincos_2d: (grid * grid, width) [sin x, cos x, sin y, cos y]."""
  y, x = np.mgrid[:grid, :grid]
  omega = np.arange(width // 4) / (width // 4 - 1)
  omega = 1. / (temperature ** omega)
  y = np.einsum('m,d->md', y.flatten(), omega)
  x = np.einsum('m,d->md', x.flatten(), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def from_big_vision(flat: dict[str, np.ndarray], source: str) -> tuple[dict, np.ndarray | None]:
  """({'encoder': our encoder subtree, unrolled, without 'pos_embedding'; 'head' when the
  checkpoint has one}, the (L, D) learned position embedding, or None for big_vision's
  fixed sincos2d, which `sincos2d` computes for any grid)."""
  prefix = image_tower_prefix(flat)
  names = {name[len(prefix):]: value for name, value in flat.items() if name.startswith(prefix)}
  refused = sorted({part for name in names for part in _REFUSED if name.startswith(part)})
  if refused:
    raise CheckpointMismatchError(
        f'{source} has {refused[0]} (a {"MAP pooling head" if refused[0] == "MAPHead_0" else "pre-logits layer"}), '
        "which this project's ViT has no counterpart for: start from a checkpoint pooled by "
        "its cls token ('tok') or the patches' mean ('gap').")
  tree = _nest(names)
  encoder: dict = {'patch_embed': tree['embedding']}
  if 'cls' in tree:
    encoder['cls_token'] = tree['cls']
  stack_in = tree.get('Transformer', {})
  stack: dict = {}
  if 'encoderblock' in stack_in:  # scanned: one subtree, a leading layer axis
    stack[transformer.SCANNED_BLOCKS] = _rename_block(stack_in['encoderblock'])
    stack = transformer.scanned_to_unrolled(stack)
  for name, block in stack_in.items():
    if match := re.fullmatch(r'encoderblock_(\d+)', name):
      stack[transformer.block_name(int(match.group(1)))] = _rename_block(block)
  if 'encoder_norm' not in stack_in:
    raise CheckpointMismatchError(f'{source} has no Transformer/encoder_norm: not a big_vision '
                                  'ViT checkpoint.')
  stack[transformer.FINAL_NORM] = stack_in['encoder_norm']
  encoder[transformer.TOWER_STACK] = stack
  parts = {'encoder': encoder}
  if 'head' in tree:
    parts['head'] = tree['head']
  return parts, tree['pos_embedding'][0] if 'pos_embedding' in tree else None


def _rename_block(block: dict) -> dict:
  out: dict = {}
  for source, target in _BLOCK_RENAMES.items():
    node = block
    for part in source.split('/'):
      node = node[part]
    parent = out
    *parents, leaf = target.split('/')
    for name in parents:
      parent = parent.setdefault(name, {})
    parent[leaf] = node
  return out
