"""AIM: autoregressive image pretraining with prefix-causal attention (docs/methods.md, section 5).

Patches in raster order; position i predicts patch i+1. Per example a prefix
length P ~ U{1..L-1}: query i may attend key j iff j < P or j <= i, so the
prefix is seen bidirectionally (as at evaluation, where attention is fully
bidirectional) and the rest causally. Prefix patches are never targets: each
example has L - P targets, patches P..L-1, predicted from positions P-1..L-2.
The loss is MAE's per-patch normalized pixel MSE on those targets only.

(choice) The paper's trunk drops biases; ours keeps the shared ViT blocks'
biases, so one encoder serves every objective and transfers between them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from big_pretrain import schema
from big_pretrain.errors import ConfigError
from big_pretrain.models.decoders import AIMHead
from big_pretrain.models.patches import normalize_images, patchify
from big_pretrain.models.transformer import MLP_RATIO, dense_flops
from big_pretrain.models.vit import (VisionTransformer, compute_dtype, num_patches,
                                     parse_variant, vit_from_config)
from big_pretrain.objectives.mae import normalize_patches
from big_pretrain.objectives.objective import Objective

# config.objective for AIM (the paper's head: 12 MLP blocks of width 2048).
CONFIG_KEYS = schema.Group(
    'AIM: autoregressive image pretraining',
    name=schema.Key('aim', schema.REQUIRED_TEXT, 'the objective'),
    head_width=schema.Key(2048, schema.COUNT, "the per-patch MLP head's width"),
    head_depth=schema.Key(12, schema.COUNT, "the head's MLP blocks"),
    norm_pix_loss=schema.Key(True, schema.BOOLEAN,
                             'targets are the pixels of each patch normalized by their mean '
                             'and variance'),
)


def sample_prefix_lengths(rng: jax.Array, batch_size: int, num_patches: int) -> jax.Array:
  """P ~ U{1, ..., L-1} per example."""
  return jax.random.randint(rng, (batch_size,), 1, num_patches)


def prefix_causal_mask(prefix_lengths: jax.Array, num_patches: int) -> jax.Array:
  """(B, 1, L, L) bool: query i may attend key j iff j < P or j <= i."""
  query = jnp.arange(num_patches)[:, None]
  key = jnp.arange(num_patches)[None, :]
  in_prefix = key[None] < prefix_lengths[:, None, None]
  return (in_prefix | (key <= query)[None])[:, None]


def target_weights(prefix_lengths: jax.Array, num_patches: int) -> jax.Array:
  """(B, L-1): 1 where target patch t = 1..L-1 is predicted (t >= P), else 0. Sums to L - P."""
  targets = jnp.arange(1, num_patches)
  return (targets[None] >= prefix_lengths[:, None]).astype(jnp.float32)


def next_patch_loss(pred: jax.Array, target: jax.Array, prefix_lengths: jax.Array) -> jax.Array:
  """Position i predicts patch i+1; per-patch MSE averaged over the L - P targets of each example."""
  num_patches = target.shape[1]
  per_patch = jnp.mean(jnp.square(pred[:, :-1].astype(jnp.float32) - target[:, 1:]), axis=-1)
  weights = target_weights(prefix_lengths, num_patches)
  return jnp.sum(per_patch * weights) / jnp.sum(weights)


class AIMModel(nn.Module):
  """Trunk (params['encoder'], no cls token) + per-patch MLP head."""
  encoder: VisionTransformer
  head_width: int
  head_depth: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, attention_mask):
    tokens = self.encoder(images, attention_mask=attention_mask)['patch_tokens']
    return AIMHead(self.head_width, self.head_depth, self.encoder.patch_size ** 2 * 3,
                   dtype=self.dtype, name='head')(tokens)


class AIM(Objective):
  name = 'aim'
  config_keys = CONFIG_KEYS

  @classmethod
  def tiny_settings(cls):
    return {'model.use_cls_token': False, 'model.pool': 'gap', 'objective.head_width': 32,
            'objective.head_depth': 1}

  @classmethod
  def check_config(cls, config, path):
    if config.model.use_cls_token:
      raise ConfigError(f'{path}.model.use_cls_token must be False for AIM: its trunk has no '
                        "cls token (set model.pool='gap' too).")

  @classmethod
  def flops_beyond_encoder(cls, config, encoder_tokens, num_labels=None):
    """The per-patch MLP head over every patch position."""
    del encoder_tokens, num_labels
    objective = config.objective
    size = parse_variant(config.model.variant)
    width, depth = objective.head_width, objective.head_depth
    rows = config.batch_size * num_patches(config.model, config.data.image_size)
    return {
        'head/embed': dense_flops(rows, size.width, width),
        'head/mlp': depth * (dense_flops(rows, width, MLP_RATIO * width)
                             + dense_flops(rows, MLP_RATIO * width, width)),
        'head/predict': dense_flops(rows, width, size.patch_size ** 2 * 3),
    }

  def __init__(self, config):
    super().__init__(config)
    self.norm_pix_loss = config.objective.norm_pix_loss
    self.model = AIMModel(
        encoder=vit_from_config(config.model), head_width=config.objective.head_width,
        head_depth=config.objective.head_depth, dtype=compute_dtype(config.model.dtype))

  @property
  def num_patches(self) -> int:
    return (self.config.data.image_size // self.model.encoder.patch_size) ** 2

  def init_params(self, rng):
    return self.model.init({'params': rng}, self.dummy_images(), None)['params']

  def loss(self, params, batch, rng, train=True):
    del train  # The prefix-causal mask defines the loss; evaluation probes run bidirectionally.
    images = normalize_images(batch['image'])
    batch_size, num_patches = images.shape[0], self.num_patches
    prefix_lengths = sample_prefix_lengths(rng, batch_size, num_patches)
    pred = self.model.apply({'params': params}, images,
                            prefix_causal_mask(prefix_lengths, num_patches))
    target = patchify(images, self.model.encoder.patch_size)
    if self.norm_pix_loss:
      target = normalize_patches(target)
    loss = next_patch_loss(pred, target, prefix_lengths)
    return loss, {'loss': loss, 'mean_prefix_length': prefix_lengths.mean()}
