"""Our ViT's parameters <-> timm's VisionTransformer state dict (PyTorch layout, numpy arrays).

timm's names are also the MAE reference's (its models are timm ViTs, plus `decoder_*` and
`mask_token` for the decoder), so this one layout serves timm exports, timm imports and the
released MAE `.pth` files. What differs from ours, and how each is converted:

  ours (flax)                                  timm (torch)
  patch_embed/kernel (p, p, C, D)              patch_embed.proj.weight (D, C, p, p)
  cls_token (1, 1, D)                          cls_token (1, 1, D)
  pos_embedding (1, L, D), or the fixed        pos_embed (1, [1 +] L, D): the cls token's
    sin-cos one, no entry for the cls token      row is zero here; a non-zero one (a timm
                                                 learned embedding) is added to cls_token
  block_i/norm1 {scale, bias}                  blocks.i.norm1 {weight, bias}
  block_i/attention/{query,key,value}          blocks.i.attn.qkv (3D, D): q, k, v stacked,
    kernel (D, heads, head_dim)                  each (heads * head_dim) rows, head-major
  block_i/attention/out kernel (heads, hd, D)  blocks.i.attn.proj (D, heads * hd)
  block_i/mlp/fc1, fc2 kernel (in, out)        blocks.i.mlp.fc1, fc2 weight (out, in)
  transformer/norm                             norm
  fc_norm, head (fine-tuning, WSP)             fc_norm, head

Every operation is a reshape, transpose, concatenation or slice: values are unchanged.
"""

from __future__ import annotations

import re

import numpy as np

from big_pretrain.errors import CheckpointMismatchError
from big_pretrain.models import transformer

StateDict = dict[str, np.ndarray]

_TIMM_BLOCK = re.compile(r'^blocks\.(\d+)\.')
_MAE_DECODER_BLOCK = re.compile(r'^decoder_blocks\.(\d+)\.')


def _linear_to_torch(dense: dict, prefix: str) -> StateDict:
  """flax Dense {kernel (in, out), bias} -> torch Linear {weight (out, in), bias}."""
  kernel = np.asarray(dense['kernel'])
  return {f'{prefix}.weight': np.ascontiguousarray(kernel.reshape(-1, kernel.shape[-1]).T),
          f'{prefix}.bias': np.asarray(dense['bias']).reshape(-1)}


def _linear_from_torch(state: 'StateReader', prefix: str) -> dict:
  return {'kernel': np.ascontiguousarray(state.take(f'{prefix}.weight').T),
          'bias': state.take(f'{prefix}.bias')}


def _norm_to_torch(norm: dict, prefix: str) -> StateDict:
  return {f'{prefix}.weight': np.asarray(norm['scale']), f'{prefix}.bias': np.asarray(norm['bias'])}


def _norm_from_torch(state: 'StateReader', prefix: str) -> dict:
  return {'scale': state.take(f'{prefix}.weight'), 'bias': state.take(f'{prefix}.bias')}


class StateReader:
  """A state dict whose entries are taken one by one, so that what is left over (keys no
  converter read) and what is missing are named."""

  def __init__(self, state: StateDict, source: str):
    self.state = state
    self.source = source
    self.taken: set[str] = set()

  def __contains__(self, key: str) -> bool:
    return key in self.state

  def take(self, key: str) -> np.ndarray:
    if key not in self.state:
      near = sorted(k for k in self.state if k.split('.')[0] == key.split('.')[0])[:3]
      raise CheckpointMismatchError(
          f'{self.source} has no {key!r}' + (f' (it has e.g. {near})' if near else '') +
          ': it is not a ViT checkpoint in the layout its format promises.')
    self.taken.add(key)
    return np.asarray(self.state[key])

  def left_over(self) -> list[str]:
    return sorted(set(self.state) - self.taken)


def num_blocks(keys, pattern: re.Pattern = _TIMM_BLOCK) -> int:
  """The blocks of a state dict's tower (the largest block index + 1)."""
  indices = [int(m.group(1)) for key in keys if (m := pattern.match(key))]
  return max(indices) + 1 if indices else 0


def block_to_torch(block: dict, prefix: str) -> StateDict:
  """One of our blocks -> timm's Block entries under `prefix` ('blocks.3')."""
  attention = block['attention']
  width = np.asarray(attention['query']['kernel']).shape[0]
  qkv_weight = np.concatenate(
      [np.asarray(attention[name]['kernel']).reshape(width, -1).T
       for name in ('query', 'key', 'value')], axis=0)
  qkv_bias = np.concatenate(
      [np.asarray(attention[name]['bias']).reshape(-1) for name in ('query', 'key', 'value')])
  out = {**_norm_to_torch(block['norm1'], f'{prefix}.norm1'),
         f'{prefix}.attn.qkv.weight': np.ascontiguousarray(qkv_weight),
         f'{prefix}.attn.qkv.bias': qkv_bias,
         **_linear_to_torch(attention['out'], f'{prefix}.attn.proj'),
         **_norm_to_torch(block['norm2'], f'{prefix}.norm2'),
         **_linear_to_torch(block['mlp']['fc1'], f'{prefix}.mlp.fc1'),
         **_linear_to_torch(block['mlp']['fc2'], f'{prefix}.mlp.fc2')}
  return out


def block_from_torch(state: StateReader, prefix: str, num_heads: int) -> dict:
  """timm's Block entries under `prefix` -> one of our blocks (its attention in `num_heads`)."""
  qkv_weight = state.take(f'{prefix}.attn.qkv.weight')
  qkv_bias = state.take(f'{prefix}.attn.qkv.bias')
  inner, width = qkv_weight.shape[0] // 3, qkv_weight.shape[1]
  if inner % num_heads:
    raise CheckpointMismatchError(
        f'{state.source}: {prefix}.attn.qkv has {inner} channels per projection, which '
        f"{num_heads} heads (this config's model.variant) do not divide.")
  head_dim = inner // num_heads
  attention = {}
  for index, name in enumerate(('query', 'key', 'value')):
    rows = slice(index * inner, (index + 1) * inner)
    attention[name] = {
        'kernel': np.ascontiguousarray(qkv_weight[rows].T).reshape(width, num_heads, head_dim),
        'bias': qkv_bias[rows].reshape(num_heads, head_dim)}
  proj = _linear_from_torch(state, f'{prefix}.attn.proj')
  attention['out'] = {'kernel': proj['kernel'].reshape(num_heads, head_dim, -1),
                      'bias': proj['bias']}
  return {'norm1': _norm_from_torch(state, f'{prefix}.norm1'),
          'attention': attention,
          'norm2': _norm_from_torch(state, f'{prefix}.norm2'),
          'mlp': {'fc1': _linear_from_torch(state, f'{prefix}.mlp.fc1'),
                  'fc2': _linear_from_torch(state, f'{prefix}.mlp.fc2')}}


def _stack_to_torch(stack: dict, block_prefix: str) -> StateDict:
  """A Transformer's blocks (either layout) -> timm entries '<block_prefix>.<i>.*'."""
  unrolled = transformer.scanned_to_unrolled(stack)
  out = {}
  for layer in range(num_stack_blocks(unrolled)):
    out.update(block_to_torch(unrolled[transformer.block_name(layer)], f'{block_prefix}.{layer}'))
  return out


def num_stack_blocks(unrolled_stack: dict) -> int:
  return sum(1 for key in unrolled_stack if re.fullmatch(r'block_\d+', key))


def _stack_from_torch(state: StateReader, block_prefix: str, depth: int, num_heads: int) -> dict:
  return {transformer.block_name(layer): block_from_torch(state, f'{block_prefix}.{layer}',
                                                          num_heads)
          for layer in range(depth)}


def position_rows(posemb: np.ndarray, use_cls_token: bool) -> np.ndarray:
  """(L, D) patch position embeddings -> timm's pos_embed (1, [1 +] L, D): a zero row for
  the cls token, which our ViT gives no position (as the MAE reference does)."""
  posemb = np.asarray(posemb, np.float32)[None]
  if use_cls_token:
    posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
  return posemb


def encoder_to_torch(encoder: dict, patch_posemb: np.ndarray) -> StateDict:
  """Our encoder subtree -> timm's VisionTransformer entries (no head).

  `patch_posemb`: the (L, D) position embedding the encoder adds to its patches (the
  fixed sin-cos one, or params' learned 'pos_embedding'[0]).
  """
  kernel = np.asarray(encoder['patch_embed']['kernel'])  # (p, p, C, D)
  use_cls_token = 'cls_token' in encoder
  out = {'patch_embed.proj.weight': np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)),
         'patch_embed.proj.bias': np.asarray(encoder['patch_embed']['bias']),
         'pos_embed': position_rows(patch_posemb, use_cls_token)}
  if use_cls_token:
    out['cls_token'] = np.asarray(encoder['cls_token'])
  stack = encoder[transformer.TOWER_STACK]
  out.update(_stack_to_torch({k: v for k, v in stack.items() if k != transformer.FINAL_NORM},
                             'blocks'))
  out.update(_norm_to_torch(stack[transformer.FINAL_NORM], 'norm'))
  return out


def encoder_from_torch(state: StateReader, num_heads: int, use_cls_token: bool,
                       prefix: str = '') -> tuple[dict, np.ndarray]:
  """timm entries (under `prefix`, e.g. '' or 'model.') -> (our encoder subtree, unrolled and
  without 'pos_embedding'; the (L, D) position embedding of the patches).

  A cls token's own position row, when not zero, is added to the cls token: our ViT adds
  none to it, and cls + row is what timm's forward computes.
  """
  p = prefix
  weight = state.take(f'{p}patch_embed.proj.weight')  # (D, C, p, p)
  encoder = {'patch_embed': {'kernel': np.ascontiguousarray(weight.transpose(2, 3, 1, 0)),
                             'bias': state.take(f'{p}patch_embed.proj.bias')}}
  pos_embed = state.take(f'{p}pos_embed')[0]
  has_cls = f'{p}cls_token' in state
  if has_cls != use_cls_token:
    raise CheckpointMismatchError(
        f'{state.source} {"has" if has_cls else "has no"} cls token, and this config sets '
        f'model.use_cls_token={use_cls_token}: set it to {has_cls}.')
  if has_cls:
    cls_token = state.take(f'{p}cls_token')
    if not _is_square(pos_embed.shape[0]):  # a row for the cls token, then the patches'
      if np.any(pos_embed[0] != 0):
        cls_token = cls_token + pos_embed[0]
      pos_embed = pos_embed[1:]
    encoder['cls_token'] = cls_token
  depth = num_blocks((k[len(p):] for k in state.state if k.startswith(p)))
  stack = _stack_from_torch(state, f'{p}blocks', depth, num_heads)
  stack[transformer.FINAL_NORM] = _norm_from_torch(state, f'{p}norm')
  encoder[transformer.TOWER_STACK] = stack
  return encoder, pos_embed


def _is_square(count: int) -> bool:
  return int(round(np.sqrt(count))) ** 2 == count


def decoder_to_torch(decoder: dict, patch_posemb: np.ndarray, use_cls_token: bool) -> StateDict:
  """Our MAE decoder subtree -> the MAE reference's decoder_* entries and mask_token.
  `patch_posemb`: its fixed (L, Dd) sin-cos embedding."""
  stack = decoder[transformer.TOWER_STACK]
  out = {**_linear_to_torch(decoder['embed'], 'decoder_embed'),
         'mask_token': np.asarray(decoder['mask_token']),
         'decoder_pos_embed': position_rows(patch_posemb, use_cls_token)}
  out.update(_stack_to_torch({k: v for k, v in stack.items() if k != transformer.FINAL_NORM},
                             'decoder_blocks'))
  out.update(_norm_to_torch(stack[transformer.FINAL_NORM], 'decoder_norm'))
  out.update(_linear_to_torch(decoder['predict'], 'decoder_pred'))
  return out


def decoder_from_torch(state: StateReader, num_heads: int) -> dict:
  """The MAE reference's decoder_* entries -> our MAE decoder subtree (unrolled). Its
  decoder_pos_embed, a fixed sin-cos table our decoder computes, is read and checked by
  the caller."""
  depth = num_blocks(state.state, _MAE_DECODER_BLOCK)
  stack = _stack_from_torch(state, 'decoder_blocks', depth, num_heads)
  stack[transformer.FINAL_NORM] = _norm_from_torch(state, 'decoder_norm')
  return {'embed': _linear_from_torch(state, 'decoder_embed'),
          'mask_token': state.take('mask_token'),
          transformer.TOWER_STACK: stack,
          'predict': _linear_from_torch(state, 'decoder_pred')}


def head_to_torch(params: dict) -> StateDict:
  """A classifier's fc_norm and head (fine-tuning, WSP), where params has them."""
  out = {}
  if 'fc_norm' in params:
    out.update(_norm_to_torch(params['fc_norm'], 'fc_norm'))
  if 'head' in params:
    out.update(_linear_to_torch(params['head'], 'head'))
  return out


def head_from_torch(state: StateReader, prefix: str = '') -> dict:
  """fc_norm and head, those the state dict has."""
  out = {}
  if f'{prefix}fc_norm.weight' in state:
    out['fc_norm'] = _norm_from_torch(state, f'{prefix}fc_norm')
  if f'{prefix}head.weight' in state:
    out['head'] = _linear_from_torch(state, f'{prefix}head')
  return out

