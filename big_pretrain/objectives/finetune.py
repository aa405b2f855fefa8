"""Fine-tuning: the downstream protocol MAE and MAWS are judged by (MAE, appendix A.1).

The encoder comes from an earlier stage or checkpoint (`init_from`), the head
is fresh and zero-initialized. Pooling 'gap' is MAE's fine-tuning default:
the mean of the patch tokens, then a LayerNorm (`fc_norm`); 'cls' takes the
cls token. (choice) MAE drops the encoder's final norm when it pools this
way; ours keeps it (it transfers from pretraining, so every encoder
checkpoint fits unchanged) and normalizes again after the mean.

In training, mixup / cutmix mix each batch with itself reversed (timm's
`Mixup`, mode 'batch': one lambda per batch, cutmix with probability
`switch_prob`, lambda corrected to the box's area) and the targets are
label-smoothed; both are drawn from the step's rng inside the jitted step,
so a resumed run mixes exactly as an uninterrupted one. Stochastic depth is
`config.model.drop_path`; layer-wise lr decay and frozen parameters are the
optimizer's (`config.optim.layer_decay`, `trainable` below).

Labels: the source's class label ('label', single-label), or with
`config.data.labels.vocabulary` set its several labels ('label_ids'), whose
count-normalized multi-hot vector is the target (as WSP's).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import linen as nn

from big_pretrain import schema
from big_pretrain.data import sources
from big_pretrain.data.text.labels import LabelVocabulary
from big_pretrain.errors import ConfigError
from big_pretrain.models.patches import normalize_images
from big_pretrain.models.transformer import dense, dense_flops, layer_norm
from big_pretrain.models.vit import (VisionTransformer, encoder_block_prefix,
                                     encoder_final_norm_prefix, parse_variant, scan_layers,
                                     vit_from_config)
from big_pretrain.objectives.objective import CLASSIFIES, Objective

TRAINABLE_CHOICES = ('all', 'last_k_blocks', 'last_block_mlp', 'head')

# config.objective for fine-tuning, with MAE's recipe where it has one.
CONFIG_KEYS = schema.Group(
    'fine-tuning: a fresh head on an earlier stage\'s encoder',
    name=schema.Key('finetune', schema.REQUIRED_TEXT, 'the objective'),
    num_classes=schema.Key(
        None, schema.at_least(1, integer=True, or_none=True),
        "the head's classes; None: config.data's source's (or the label vocabulary's size)",
        type=int),
    label_smoothing=schema.Key(0.1, schema.UNIT_FRACTION, 'label smoothing of the targets'),
    mixup_alpha=schema.Key(0.8, schema.at_least(0), "mixup's Beta(alpha, alpha); 0: no mixup"),
    cutmix_alpha=schema.Key(1.0, schema.at_least(0),
                            "cutmix's Beta(alpha, alpha); 0: no cutmix"),
    switch_prob=schema.Key(0.5, schema.within(0, 1),
                           'with both on: the chance a batch gets cutmix instead of mixup'),
    trainable=schema.Key(
        'all', schema.one_of(*TRAINABLE_CHOICES),
        "what trains: 'all'; 'last_k_blocks' (the last trainable_blocks blocks, the final "
        "norm and the head); 'last_block_mlp' (the last block's MLP, the final norm, the "
        "head); 'head' (a linear probe trained like the rest)"),
    trainable_blocks=schema.Key(1, schema.COUNT, "the blocks 'last_k_blocks' trains"),
    head_dropout=schema.Key(0.0, schema.UNIT_FRACTION,
                            'dropout before the head, in training (Noisy Student: 0.5)'),
)


def mixup_or_cutmix(rng: jax.Array, images: jax.Array, targets: jax.Array, *,
                    mixup_alpha: float, cutmix_alpha: float, switch_prob: float):
  """A batch mixed with itself reversed, and its targets mixed alike (timm's Mixup, 'batch').

  images: float (B, H, W, C); targets: (B, K) rows summing to 1. One lambda
  for the batch, ~ Beta(alpha, alpha) of the method drawn; cutmix pastes one
  box of area about 1 - lambda from the reversed batch and corrects lambda
  to the box's exact area. Returns (images, targets, lambda, used_cutmix).
  """
  use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
  if not (use_mixup or use_cutmix):
    return images, targets, jnp.float32(1.0), jnp.bool_(False)
  switch_rng, mixup_rng, cutmix_rng, box_rng = jax.random.split(rng, 4)
  if use_mixup and use_cutmix:
    cutmix = jax.random.bernoulli(switch_rng, switch_prob)
  else:
    cutmix = jnp.bool_(use_cutmix)
  mixup_lam = jax.random.beta(mixup_rng, mixup_alpha, mixup_alpha) if use_mixup else 1.0
  cutmix_lam = jax.random.beta(cutmix_rng, cutmix_alpha, cutmix_alpha) if use_cutmix else 1.0
  box, box_lam = cutmix_box(box_rng, images.shape[1], images.shape[2], cutmix_lam)
  reversed_images = images[::-1]
  mixed = mixup_lam * images + (1 - mixup_lam) * reversed_images
  pasted = jnp.where(box[None, :, :, None], reversed_images, images)
  images = jnp.where(cutmix, pasted, mixed).astype(images.dtype)
  lam = jnp.where(cutmix, box_lam, mixup_lam).astype(jnp.float32)
  targets = lam * targets + (1 - lam) * targets[::-1]
  return images, targets, lam, cutmix


def cutmix_box(rng: jax.Array, height: int, width: int, lam: jax.Array):
  """timm's rand_bbox: a box of sides sqrt(1 - lam) x (H, W) centred anywhere, clipped.

  Returns (mask (H, W) bool, True inside the box; the corrected lambda
  1 - box area / image area).
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = (height * ratio).astype(jnp.int32)
  cut_w = (width * ratio).astype(jnp.int32)
  y_rng, x_rng = jax.random.split(rng)
  center_y = jax.random.randint(y_rng, (), 0, height)
  center_x = jax.random.randint(x_rng, (), 0, width)
  top, bottom = jnp.clip(center_y - cut_h // 2, 0, height), jnp.clip(center_y + cut_h // 2, 0, height)
  left, right = jnp.clip(center_x - cut_w // 2, 0, width), jnp.clip(center_x + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  mask = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  corrected = 1.0 - ((bottom - top) * (right - left)) / (height * width)
  return mask, corrected


def smoothed_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """timm's targets: 1 - smoothing + smoothing / K on the label, smoothing / K elsewhere."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def multi_hot_targets(label_ids: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """label_ids (B, M), -1 = padding -> count-normalized multi-hot rows, label-smoothed.

  A row without labels becomes uniform (it still sums to 1).
  """
  hot = jax.nn.one_hot(label_ids, num_classes).sum(axis=1)  # -1 gives an all-zero row
  count = hot.sum(axis=-1, keepdims=True)
  normalized = jnp.where(count > 0, hot / jnp.maximum(count, 1), 1.0 / num_classes)
  return normalized * (1.0 - smoothing) + smoothing / num_classes


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example -sum_c t_c log softmax(z)_c."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def num_classes(config) -> int:
  """config.objective.num_classes, else the label vocabulary's size or the source's classes."""
  if config.objective.num_classes:
    return config.objective.num_classes
  if config.data.labels.vocabulary:
    return len(LabelVocabulary.from_file(config.data.labels.vocabulary))
  count = sources.build_source(config.data).num_classes
  if count < 2:
    raise ConfigError(
        f'config.data ({config.data.source}) has {count} classes: fine-tuning needs a labelled '
        'source (class subfolders, an ArrayRecord folder with class names, a tfds label), or '
        'set config.objective.num_classes.')
  return count


class ClassifierModel(nn.Module):
  """ViT encoder (params['encoder']) -> pooled feature -> head (params['head'])."""
  encoder: VisionTransformer
  num_classes: int
  head_dropout: float = 0.0  # before the head, in training (Noisy Student's student: 0.5)

  @nn.compact
  def __call__(self, images, train: bool = False):
    outputs = self.encoder(images, train=train)
    if self.encoder.pool == 'gap':
      pooled = layer_norm(self.encoder.dtype, name='fc_norm')(outputs['patch_tokens'].mean(axis=1))
    else:
      pooled = outputs['pooled']
    if self.head_dropout:
      pooled = nn.Dropout(self.head_dropout, deterministic=not train)(pooled)
    # Zero-initialized: every class starts equally likely (MAE: std 2e-5, i.e. about zero).
    return dense(self.num_classes, ('embed', 'vocab'), self.encoder.dtype, name='head',
                 kernel_init=nn.initializers.zeros)(pooled)


class Finetune(Objective):
  name = 'finetune'
  config_keys = CONFIG_KEYS
  offers = frozenset({CLASSIFIES})

  @classmethod
  def tiny_settings(cls):
    return {'model.pool': 'gap'}

  @classmethod
  def exported_head(cls, config):
    return 'multi_label' if config.data.labels.vocabulary else 'single_label'

  @classmethod
  def check_config(cls, config, path):
    objective = config.objective
    if objective.trainable in ('last_k_blocks', 'last_block_mlp') and scan_layers(
        config.model.scan, parse_variant(config.model.variant).depth):
      raise ConfigError(
          f'{path}.objective.trainable={objective.trainable!r} freezes some layers, which '
          f'needs unrolled layers: set {path}.model.scan=False (init_from converts a scanned '
          'checkpoint on load).')

  @classmethod
  def flops_beyond_encoder(cls, config, encoder_tokens, num_labels=None):
    """The linear head over the classes."""
    del encoder_tokens
    classes = num_classes(config) if num_labels is None else num_labels
    return {'head': dense_flops(config.batch_size, parse_variant(config.model.variant).width,
                                classes)}

  @classmethod
  def resolve_config(cls, config):
    """objective.num_classes read off the data once: listing a large image folder is slow,
    and the objective, the FLOPs count and remat 'auto' each need it."""
    config = super().resolve_config(config)
    if config.objective.num_classes:
      return config
    config = config.copy_and_resolve_references()
    config.objective.num_classes = num_classes(config)
    return config

  def __init__(self, config):
    super().__init__(config)
    objective = config.objective
    self.multi_label = bool(config.data.labels.vocabulary)
    self.num_classes = num_classes(config)
    self.model = ClassifierModel(encoder=vit_from_config(config.model),
                                 num_classes=self.num_classes,
                                 head_dropout=objective.head_dropout)
    self._trainable_pattern = _trainable_pattern(
        objective.trainable, objective.trainable_blocks, self.model.encoder.depth)

  def init_params(self, rng):
    return self.model.init({'params': rng}, self.dummy_images())['params']

  def is_trainable(self, path: str) -> bool:
    return self._trainable_pattern.search(path) is not None

  def targets(self, batch) -> jax.Array:
    smoothing = self.config.objective.label_smoothing
    if self.multi_label:
      return multi_hot_targets(batch['label_ids'], self.num_classes, smoothing)
    return smoothed_one_hot(batch['label'], self.num_classes, smoothing)

  def loss(self, params, batch, rng, train=True):
    objective = self.config.objective
    mix_rng, dropout_rng = jax.random.split(rng)
    images = normalize_images(batch['image'])
    targets = self.targets(batch)
    if train:
      images, targets, lam, used_cutmix = mixup_or_cutmix(
          mix_rng, images, targets, mixup_alpha=objective.mixup_alpha,
          cutmix_alpha=objective.cutmix_alpha, switch_prob=objective.switch_prob)
    logits = self.model.apply({'params': params}, images, train=train,
                              rngs={'dropout': dropout_rng})
    loss = soft_cross_entropy(logits, targets).mean()
    metrics = {'loss': loss}
    if train:
      metrics.update(mix_lambda=lam, cutmix_fraction=used_cutmix.astype(jnp.float32))
    return loss, metrics

  def predict(self, params, images: jax.Array) -> jax.Array:
    """Class logits (B, num_classes) of uint8 images, no augmentation (evaluators)."""
    return self.model.apply({'params': params}, normalize_images(images))


def _trainable_pattern(trainable: str, blocks: int, depth: int) -> re.Pattern:
  """The parameter paths ('encoder/transformer/block_3/mlp/fc1/kernel') that train."""
  head = r'^(head|fc_norm)/'
  if trainable == 'all':
    return re.compile('')
  if trainable == 'head':
    return re.compile(head)
  final_norm = '^' + re.escape(encoder_final_norm_prefix())
  if trainable == 'last_block_mlp':
    return re.compile(f'{head}|{final_norm}|^{re.escape(encoder_block_prefix(depth - 1))}mlp/')
  last = '|'.join('^' + re.escape(encoder_block_prefix(layer))
                  for layer in range(max(depth - blocks, 0), depth))
  return re.compile(f'{head}|{final_norm}|{last}')
