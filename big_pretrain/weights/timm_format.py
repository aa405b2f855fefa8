"""timm's VisionTransformer, read and written; and the MAE reference's releases, in its names.

Read: a timm model folder (config.json with "architecture", model.safetensors), or a
.safetensors / .pth / .pt / .bin file (or a folder without config.json) whose arrays have
timm's names (timm_layout.py) -- which are also the MAE reference's: its .pth releases,
{'model': timm names, plus decoder_* and mask_token in the visualization ones}, are read
here, their decoder too where the stage has one. A DistributedDataParallel 'module.' prefix
is dropped. Hugging Face weights are read by renaming them to these names (hf_format.py),
then as these (read_timm_state).

Written: the folder timm.create_model('local-dir:DIR', pretrained=True) builds a
VisionTransformer from: the stage's patch size, width, depth, heads, cls token or not,
pooling, position embedding (the fixed sin-cos one stored as weights), LayerNorm eps 1e-6,
image size and ImageNet mean/std; with the stage's classifier head where it has one (fine-
tuning; WSP's hashtags as a multi-label head), else num_classes=0. timm has no MAE decoder.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from big_pretrain.errors import CheckpointMismatchError, ExportRefusedError
from big_pretrain.models.patches import IMAGENET_MEAN, IMAGENET_STD
from big_pretrain.models.vit import ENCODER
from big_pretrain.weights import timm_layout
from big_pretrain.weights.model_folder import ModelFolderFormat
from big_pretrain.weights.weight_format import (Exported, StageModel, WeightSource,
                                                attention_heads, check_cls_token, check_size,
                                                check_sincos, patch_position_embedding,
                                                place_position_embedding)

# timm builds the model from config.json's model_args over this registered architecture's
# defaults; every argument that differs is in model_args.
TIMM_ARCHITECTURE = 'vit_base_patch16_224'
# How timm's (and the MAE reference's) names begin, outside the blocks' inner names.
_TIMM_NAMES = ('patch_embed.', 'pos_embed', 'cls_token', 'blocks.', 'norm.', 'fc_norm.',
               'head.', 'decoder_', 'mask_token')
_DATA_PARALLEL_PREFIX = 'module.'  # torch's DistributedDataParallel's, in saved state dicts
# Entries a checkpoint may carry that our ViT does without, changing nothing it computes.
_IGNORED_PREFIXES = ('pooler.',)  # HF ViTModel's pooler (dense + tanh), outside the features


class TimmFormat(ModelFolderFormat):
  name = 'timm'
  title = 'timm'
  config_key = 'architecture'

  def names_are_ours(self, names: list[str]) -> bool:
    return any(_without_data_parallel_prefix(name).startswith(_TIMM_NAMES) for name in names)

  def read(self, source: WeightSource, target: dict) -> dict:
    return read_timm_state(source.arrays, source.path, target)

  def write(self, model: StageModel, params: dict, labels: list[str] | None) -> Exported:
    if model.head and 'fc_norm' in params:
      raise ExportRefusedError(
          "timm's VisionTransformer normalizes either the tokens before pooling (norm) or the "
          "pooled feature (fc_norm), and this stage's model.pool='gap' classifier does both: "
          'export the encoder alone with --encoder_only (its features are exact), or '
          "fine-tune with model.pool='cls'.")
    state = timm_layout.encoder_to_torch(params[ENCODER],
                                         patch_position_embedding(model, params[ENCODER]))
    num_classes = 0
    if model.head:
      state.update(timm_layout.head_to_torch(params))
      num_classes = int(np.asarray(params['head']['kernel']).shape[-1])
    global_pool = 'token' if model.pool == 'cls' else 'avg'
    model_args = {
        'img_size': model.image_size, 'patch_size': model.patch_size, 'embed_dim': model.width,
        'depth': model.depth, 'num_heads': model.heads, 'mlp_ratio': 4.0, 'qkv_bias': True,
        'class_token': model.use_cls_token, 'no_embed_class': False,
        'global_pool': global_pool, 'fc_norm': False, 'num_classes': num_classes,
    }
    pretrained_cfg = {
        'input_size': [3, model.image_size, model.image_size], 'fixed_input_size': True,
        'interpolation': 'bilinear', 'crop_pct': 1.0, 'crop_mode': 'center',
        'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD), 'num_classes': num_classes,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
    }
    config = {'architecture': TIMM_ARCHITECTURE, 'num_classes': num_classes,
              'num_features': model.width, 'global_pool': global_pool,
              'model_args': model_args, 'pretrained_cfg': pretrained_cfg}
    if labels:
      config['label_names'] = labels
    if model.head:  # for people (timm reads no such field): softmax or one sigmoid per label
      config['head_activation'] = 'sigmoid' if model.head == 'multi_label' else 'softmax'
    return self.exported(state, config, f'VisionTransformer, num_classes={num_classes}')


def _without_data_parallel_prefix(name: str) -> str:
  return name[len(_DATA_PARALLEL_PREFIX):] if name.startswith(_DATA_PARALLEL_PREFIX) else name


def read_timm_state(state: dict[str, np.ndarray], path: str, target: dict) -> dict:
  """A state dict in timm's (or the MAE reference's) names -> {'encoder': ..., and 'decoder'
  / 'fc_norm' / 'head' where it has them and the stage takes them}, fitted to `target`."""
  encoder_target = target[ENCODER]
  state = {_without_data_parallel_prefix(key): value for key, value in state.items()}
  reader = timm_layout.StateReader(state, path)
  kernel = reader.take('patch_embed.proj.weight')  # (D, C, p, p)
  check_size((timm_layout.num_blocks(state), kernel.shape[0]), kernel.shape[-1],
             encoder_target, path)
  check_cls_token('cls_token' in state, 'cls_token' in encoder_target, path)
  encoder, posemb = timm_layout.encoder_from_torch(
      reader, attention_heads(encoder_target), 'cls_token' in encoder_target)
  parts = {ENCODER: encoder, **timm_layout.head_from_torch(reader)}
  if 'decoder_embed.weight' in state and 'decoder' in target:
    parts['decoder'] = timm_layout.decoder_from_torch(reader, attention_heads(target['decoder']))
    decoder_posemb = reader.take('decoder_pos_embed')[0]
    check_sincos(decoder_posemb[-_square_rows(decoder_posemb.shape[0]):],
                 'decoder_pos_embed', path, learnable=False)
  _check_nothing_left_over(reader, has_decoder='decoder' in target)
  return place_position_embedding(parts, posemb, encoder_target, path)


def _square_rows(rows: int) -> int:
  """The patch rows of a (1 [+ 1], D) table: the largest square count it ends with."""
  return rows if int(round(np.sqrt(rows))) ** 2 == rows else rows - 1


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
