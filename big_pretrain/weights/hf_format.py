"""Hugging Face transformers' ViT and ViTMAE, read and written: their names, their configs.

Read: a transformers model folder (config.json with "model_type", model.safetensors or its
shards), or a .safetensors / .bin / .pth file (or a folder without config.json) whose arrays
have transformers' names, renamed to timm's and read as those (timm_format.read_timm_state).

Written, by what the stage is: MAE: ViTMAEForPreTraining (encoder and decoder: keep
pretraining, or show reconstructions); a classifier: ViTForImageClassification; any other
encoder (FLIP's and LiT's image tower, AIM's trunk, WSP with --encoder_only): ViTModel. With
preprocessor_config.json: the ImageNet mean and std every stage trains with.

The names written are the Hub's (transformers 4's: 'encoder.layer.3.attention.attention.
query'), the layout of the ViT checkpoints published there: transformers 4 reads them as they
are, and transformers 5 renames them on load to its own ('layers.3.attention.q_proj'; the
parity tests load them with 5.25). Reading accepts both. timm's fused qkv projection is split
into HF's query, key and value (and joined back), rows unchanged.

  timm                         HF (under 'vit.' in the task models)
  cls_token, pos_embed         embeddings.cls_token, embeddings.position_embeddings
  patch_embed.proj             embeddings.patch_embeddings.projection
  blocks.i.norm1 / norm2       encoder.layer.i.layernorm_before / layernorm_after
  blocks.i.attn.qkv            encoder.layer.i.attention.attention.{query,key,value}
  blocks.i.attn.proj           encoder.layer.i.attention.output.dense
  blocks.i.mlp.fc1 / fc2       encoder.layer.i.intermediate.dense / output.dense
  norm, head                   layernorm, classifier
  decoder_embed, mask_token,   decoder.decoder_embed, decoder.mask_token,
  decoder_pos_embed,           decoder.decoder_pos_embed,
  decoder_blocks.i.*,          decoder.decoder_layers.i.* (as encoder layers),
  decoder_norm, decoder_pred   decoder.decoder_norm, decoder.decoder_pred
"""

from __future__ import annotations

import json
import re

import numpy as np

from big_pretrain.errors import ExportRefusedError
from big_pretrain.models.patches import (IMAGENET_MEAN, IMAGENET_STD,
                                         sincos_2d_position_embedding)
from big_pretrain.models.transformer import LAYERNORM_EPSILON, MLP_RATIO
from big_pretrain.models.vit import ENCODER
from big_pretrain.weights import timm_layout
from big_pretrain.weights.model_folder import ModelFolderFormat
from big_pretrain.weights.timm_format import read_timm_state
from big_pretrain.weights.weight_format import (Exported, StageModel, WeightSource,
                                                patch_position_embedding)

PREPROCESSOR_FILE = 'preprocessor_config.json'


class HfFormat(ModelFolderFormat):
  name = 'hf'
  title = 'Hugging Face'
  config_key = 'model_type'
  export_files = ModelFolderFormat.export_files + (PREPROCESSOR_FILE,)
  writes_decoder = True

  def names_are_ours(self, names: list[str]) -> bool:
    return any(_is_hf_name(name) for name in names)

  def read(self, source: WeightSource, target: dict) -> dict:
    return read_timm_state(hf_to_timm(source.arrays), source.path, target)

  def write(self, model: StageModel, params: dict, labels: list[str] | None) -> Exported:
    state, config = _state_and_config(model, params, labels)
    preprocessor = json.dumps(image_processor_config(model.image_size), indent=2).encode()
    return self.exported(state, config, config['architectures'][0],
                         {PREPROCESSOR_FILE: preprocessor})


def _state_and_config(model: StageModel, params: dict,
                      labels: list[str] | None) -> tuple[dict, dict]:
  """(state dict in the Hub's names, config.json) for transformers."""
  if not model.use_cls_token:
    raise ExportRefusedError(
        "transformers' ViT always prepends a cls token, and this stage's encoder has none "
        '(model.use_cls_token=False): its features would change. Use --format=timm.')
  if model.head and model.pool != 'cls':
    raise ExportRefusedError(
        "transformers' ViTForImageClassification classifies the cls token, and this stage "
        f"pools with model.pool={model.pool!r}: use --format=timm, or --encoder_only.")
  encoder = params[ENCODER]
  state = timm_layout.encoder_to_torch(encoder, patch_position_embedding(model, encoder))
  sizes = dict(width=model.width, depth=model.depth, heads=model.heads,
               patch_size=model.patch_size, image_size=model.image_size)
  if model.decoder:
    if model.decoder['encoder_on_all_tokens']:
      raise ExportRefusedError(
          'objective.encoder_on_all_tokens=True (the design MAE rejects) has a pixel-space '
          "mask patch that ViTMAE cannot express: use --encoder_only.")
    if model.posemb != 'sincos':
      raise ExportRefusedError(
          "ViTMAE's position embedding is the fixed sin-cos table, and this stage learned its "
          "own (model.posemb='learned'): use --encoder_only for a ViTModel.")
    grid = model.image_size // model.patch_size
    state.update(timm_layout.decoder_to_torch(
        params['decoder'], sincos_2d_position_embedding(model.decoder['width'], grid, grid),
        model.use_cls_token))
    config = vit_mae_config(
        **sizes, decoder_width=model.decoder['width'], decoder_depth=model.decoder['depth'],
        decoder_heads=model.decoder['heads'], mask_ratio=model.decoder['mask_ratio'],
        norm_pix_loss=model.decoder['norm_pix_loss'])
    return timm_to_hf(state), config
  if model.head:
    state.update(timm_layout.head_to_torch(params))
    return timm_to_hf(state), vit_config(**sizes, labels=labels,
                                         multi_label=model.head == 'multi_label')
  return timm_to_hf(state, encoder_prefix=''), vit_config(**sizes)


def _is_hf_name(key: str) -> bool:
  key = key[len('vit.'):] if key.startswith('vit.') else key
  return key.startswith(('embeddings.', 'encoder.layer.', 'layers.', 'decoder.decoder'))


StateDict = dict[str, np.ndarray]

# Within one block / layer: timm's name -> HF's.
_BLOCK_RENAMES = (
    ('norm1.', 'layernorm_before.'),
    ('norm2.', 'layernorm_after.'),
    ('attn.proj.', 'attention.output.dense.'),
    ('mlp.fc1.', 'intermediate.dense.'),
    ('mlp.fc2.', 'output.dense.'),
)
_QKV = ('query', 'key', 'value')
# Outside the blocks: timm's name -> HF's (the encoder's under the task model's prefix).
_ENCODER_RENAMES = (
    ('cls_token', 'embeddings.cls_token'),
    ('pos_embed', 'embeddings.position_embeddings'),
    ('patch_embed.proj.', 'embeddings.patch_embeddings.projection.'),
    ('norm.', 'layernorm.'),
)
_DECODER_RENAMES = (
    ('decoder_embed.', 'decoder.decoder_embed.'),
    ('mask_token', 'decoder.mask_token'),
    ('decoder_pos_embed', 'decoder.decoder_pos_embed'),
    ('decoder_norm.', 'decoder.decoder_norm.'),
    ('decoder_pred.', 'decoder.decoder_pred.'),
)
_TIMM_BLOCK = re.compile(r'^(blocks|decoder_blocks)\.(\d+)\.(.*)$')
_HF_LAYER = re.compile(r'^(encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.*)$')
# transformers 5's own names, as its save_pretrained may write them -> the Hub's.
_V5_TO_HUB = (
    (re.compile(r'(^|\.)layers\.(\d+)\.'), r'\1encoder.layer.\2.'),
    (re.compile(r'\.attention\.q_proj\.'), '.attention.attention.query.'),
    (re.compile(r'\.attention\.k_proj\.'), '.attention.attention.key.'),
    (re.compile(r'\.attention\.v_proj\.'), '.attention.attention.value.'),
    (re.compile(r'\.attention\.o_proj\.'), '.attention.output.dense.'),
    (re.compile(r'\.mlp\.fc1\.'), '.intermediate.dense.'),
    (re.compile(r'\.mlp\.fc2\.'), '.output.dense.'),
)


def _rename(key: str, renames, reverse: bool = False) -> str | None:
  for timm_name, hf_name in renames:
    source, target = (hf_name, timm_name) if reverse else (timm_name, hf_name)
    if key == source or (source.endswith('.') and key.startswith(source)):
      return target + key[len(source):]
  return None


def timm_to_hf(state: StateDict, encoder_prefix: str = 'vit.') -> StateDict:
  """timm / MAE-reference entries -> the Hub's HF names (the head as 'classifier')."""
  out = {}
  for key, value in state.items():
    if match := _TIMM_BLOCK.match(key):
      tower, layer, rest = match.groups()
      hf_layer = (f'{encoder_prefix}encoder.layer.{layer}.' if tower == 'blocks'
                  else f'decoder.decoder_layers.{layer}.')
      if rest.startswith('attn.qkv.'):
        for name, part in zip(_QKV, np.split(np.asarray(value), 3, axis=0)):
          out[f'{hf_layer}attention.attention.{name}.{rest[len("attn.qkv."):]}'] = part
        continue
      renamed = _rename(rest, _BLOCK_RENAMES)
      out[hf_layer + (renamed or rest)] = value
    elif key.startswith('head.'):
      out['classifier.' + key[len('head.'):]] = value
    elif (renamed := _rename(key, _DECODER_RENAMES)) is not None:
      out[renamed] = value
    elif (renamed := _rename(key, _ENCODER_RENAMES)) is not None:
      out[encoder_prefix + renamed] = value
    else:
      out[key] = value  # left for the caller's check to name
  return out


def hub_names(state: StateDict) -> StateDict:
  """HF entries in either transformers 4 (Hub) or 5 names -> the Hub's, without a task
  model's 'vit.' prefix."""
  out = {}
  for key, value in state.items():
    key = key[len('vit.'):] if key.startswith('vit.') else key
    for pattern, replacement in _V5_TO_HUB:
      key = pattern.sub(replacement, key)
    out[key] = value
  return out


def hf_to_timm(state: StateDict) -> StateDict:
  """HF ViT / ViTMAE entries (any prefix, either naming) -> timm / MAE-reference names.
  Entries with no timm counterpart (HF's pooler) keep their names, for the caller to
  name or ignore."""
  state = hub_names(state)
  out, qkv = {}, {}
  for key, value in state.items():
    if match := _HF_LAYER.match(key):
      tower, layer, rest = match.groups()
      timm_block = f'blocks.{layer}.' if tower == 'encoder.layer' else f'decoder_blocks.{layer}.'
      if qkv_match := re.fullmatch(r'attention\.attention\.(query|key|value)\.(weight|bias)', rest):
        qkv.setdefault((timm_block, qkv_match.group(2)), {})[qkv_match.group(1)] = value
        continue
      renamed = _rename(rest, _BLOCK_RENAMES, reverse=True)
      out[timm_block + (renamed or rest)] = value
    elif key.startswith('classifier.'):
      out['head.' + key[len('classifier.'):]] = value
    elif (renamed := _rename(key, _DECODER_RENAMES, reverse=True)) is not None:
      out[renamed] = value
    elif (renamed := _rename(key, _ENCODER_RENAMES, reverse=True)) is not None:
      out[renamed] = value
    else:
      out[key] = value
  for (timm_block, kind), parts in qkv.items():
    if set(parts) != set(_QKV):
      out.update({f'{timm_block}attention.attention.{name}.{kind}': part
                  for name, part in parts.items()})  # incomplete: named by the caller
      continue
    out[f'{timm_block}attn.qkv.{kind}'] = np.concatenate(
        [np.asarray(parts[name]) for name in _QKV], axis=0)
  return out


def vit_config(*, width: int, depth: int, heads: int, patch_size: int, image_size: int,
               labels: list[str] | None = None, multi_label: bool = False) -> dict:
  """config.json of a transformers ViTModel, or ViTForImageClassification with `labels`."""
  config = {
      'model_type': 'vit',
      'architectures': ['ViTForImageClassification' if labels else 'ViTModel'],
      'hidden_size': width, 'num_hidden_layers': depth, 'num_attention_heads': heads,
      'intermediate_size': MLP_RATIO * width, 'hidden_act': 'gelu',
      'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
      'initializer_range': 0.02, 'layer_norm_eps': LAYERNORM_EPSILON,
      'image_size': image_size, 'patch_size': patch_size, 'num_channels': 3,
      'qkv_bias': True, 'encoder_stride': patch_size, 'torch_dtype': 'float32',
  }
  if labels:
    config['id2label'] = {str(i): name for i, name in enumerate(labels)}
    config['label2id'] = {name: i for i, name in enumerate(labels)}
    config['problem_type'] = ('multi_label_classification' if multi_label
                              else 'single_label_classification')
  return config


def vit_mae_config(*, width: int, depth: int, heads: int, patch_size: int, image_size: int,
                   decoder_width: int, decoder_depth: int, decoder_heads: int,
                   mask_ratio: float, norm_pix_loss: bool) -> dict:
  """config.json of a transformers ViTMAEForPreTraining."""
  config = vit_config(width=width, depth=depth, heads=heads, patch_size=patch_size,
                      image_size=image_size)
  config.pop('encoder_stride')
  config.update({
      'model_type': 'vit_mae', 'architectures': ['ViTMAEForPreTraining'],
      'decoder_hidden_size': decoder_width, 'decoder_num_hidden_layers': decoder_depth,
      'decoder_num_attention_heads': decoder_heads,
      'decoder_intermediate_size': MLP_RATIO * decoder_width,
      'mask_ratio': mask_ratio, 'norm_pix_loss': norm_pix_loss,
  })
  return config


def image_processor_config(image_size: int) -> dict:
  """preprocessor_config.json: the ImageNet normalization every stage here trains with."""
  return {
      'image_processor_type': 'ViTImageProcessor',
      'do_resize': True, 'size': {'height': image_size, 'width': image_size},
      'resample': 2,  # bilinear
      'do_rescale': True, 'rescale_factor': 1 / 255,
      'do_normalize': True, 'image_mean': list(IMAGENET_MEAN), 'image_std': list(IMAGENET_STD),
  }
