"""MAE: masked autoencoder pre-training (docs/methods.md, section 2).

75% of the patches are dropped per example; the encoder sees only the
visible ones; a light decoder reconstructs the normalized pixels of every
patch; the loss counts the masked patches only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from big_pretrain import schema
from big_pretrain.errors import ConfigError
from big_pretrain.models.decoders import MAEDecoder
from big_pretrain.models.masking import num_kept, random_masking
from big_pretrain.models.patches import denormalize_images, normalize_images, patchify, unpatchify
from big_pretrain.models.transformer import dense_flops, transformer_forward_flops
from big_pretrain.models.vit import (VisionTransformer, compute_dtype, num_patches,
                                     parse_variant, vit_from_config)
from big_pretrain.objectives.objective import RECONSTRUCTS, Objective

NORM_PIX_EPSILON = 1e-6


# config.objective for MAE, with the paper's defaults.
CONFIG_KEYS = schema.Group(
    'MAE: masked autoencoder pretraining',
    name=schema.Key('mae', schema.REQUIRED_TEXT, 'the objective'),
    mask_ratio=schema.Key(0.75, schema.UNIT_FRACTION,
                          'the fraction of patches hidden from the encoder, per example'),
    norm_pix_loss=schema.Key(True, schema.BOOLEAN,
                             'targets are the pixels of each patch normalized by their mean '
                             'and variance'),
    decoder_width=schema.Key(512, schema.COUNT, "the decoder's width"),
    decoder_depth=schema.Key(8, schema.COUNT, "the decoder's blocks"),
    decoder_heads=schema.Key(16, schema.COUNT, "the decoder's attention heads"),
    # (benchmarks/step_speed.py --mae_all_tokens)
    encoder_on_all_tokens=schema.Key(
        False, schema.BOOLEAN,
        'benchmark only: the design the paper rejects (its Table 1c, "encoder w/ [M]"), the '
        'encoder over every patch, the masked ones replaced by a learned mask token'),
)


def normalize_patches(patches: jax.Array) -> jax.Array:
  """Per-patch norm-pix target: (t - mean) / sqrt(var + 1e-6), unbiased variance (ddof=1)."""
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + NORM_PIX_EPSILON)


def masked_patch_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over pixels of the squared error per patch, then the mean over masked patches."""
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MAEModel(nn.Module):
  """Encoder on the visible patches + decoder over all patches.

  With `encoder_on_all_tokens` (benchmark only, the design MAE rejects) the
  encoder runs over every patch, each masked one replaced by a learned mask
  token. (choice) That token is learned in pixel space, one p x p x 3 patch
  ('encoder_mask_patch') that the encoder's own patch embedding embeds, so the
  shared ViT needs no hook; it costs the same compute as an embedding-space
  [M] token, and can express any such token while width <= p*p*3 (ViT-Ti/S/B
  at patch 16). The decoder then receives all L tokens in raster order and
  adds no mask tokens of its own.
  """
  encoder: VisionTransformer
  decoder_width: int
  decoder_depth: int
  decoder_heads: int
  dtype: Any = jnp.float32
  encoder_on_all_tokens: bool = False

  @nn.compact
  def __call__(self, images, mask_rng, mask_ratio):
    patch = self.encoder.patch_size
    grid = images.shape[1] // patch
    batch, num_patches = images.shape[0], grid * grid
    masking = random_masking(mask_rng, batch, num_patches, mask_ratio)
    if self.encoder_on_all_tokens:
      mask_patch = self.param('encoder_mask_patch', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None,)), (patch * patch * 3,))
      patches = jnp.where(masking.mask[..., None] > 0, mask_patch.astype(images.dtype),
                          patchify(images, patch))
      encoded = self.encoder(unpatchify(patches, patch))['tokens']
      ids_restore = jnp.broadcast_to(jnp.arange(num_patches, dtype=jnp.int32),
                                     (batch, num_patches))
    else:
      encoded = self.encoder(images, keep_indices=masking.keep_indices)['tokens']
      ids_restore = masking.ids_restore
    pred = MAEDecoder(
        self.decoder_width, self.decoder_depth, self.decoder_heads,
        num_prefix_tokens=int(self.encoder.use_cls_token), patch_dim=self.encoder.patch_size ** 2 * 3, dtype=self.dtype,
        scan=self.encoder.scan, remat=self.encoder.remat,
        attention_impl=self.encoder.attention_impl, name='decoder',
    )(encoded, ids_restore, (grid, grid))
    return pred, masking


class MAE(Objective):
  name = 'mae'
  config_keys = CONFIG_KEYS
  offers = frozenset({RECONSTRUCTS})

  @classmethod
  def tiny_settings(cls):
    return {'objective.decoder_width': 32, 'objective.decoder_depth': 1,
            'objective.decoder_heads': 4}
  # Column order of the reconstruction grid (jit returns dict keys sorted).
  visualization_panels = ('input', 'masked', 'reconstruction', 'target_normalized',
                          'prediction_normalized')

  @classmethod
  def exported_decoder(cls, config):
    objective = config.objective
    return {'width': objective.decoder_width, 'depth': objective.decoder_depth,
            'heads': objective.decoder_heads, 'mask_ratio': objective.mask_ratio,
            'norm_pix_loss': objective.norm_pix_loss,
            'encoder_on_all_tokens': objective.encoder_on_all_tokens}

  @classmethod
  def check_config(cls, config, path):
    ratio = config.objective.mask_ratio
    # The encoder needs a visible patch, and the loss (a mean over masked ones) a masked one.
    grid = config.data.image_size // parse_variant(config.model.variant).patch_size
    kept = num_kept(grid * grid, ratio)
    if grid * grid < 2:
      raise ConfigError(
          f'{path}: data.image_size={config.data.image_size} gives {grid * grid} patch of '
          f'model.variant={config.model.variant!r}: MAE needs at least one visible and one '
          'masked patch. Raise the image size or take a smaller patch.')
    if not 0 < kept < grid * grid:
      raise ConfigError(
          f'{path}.objective.mask_ratio={ratio} keeps {kept} of the {grid * grid} patches '
          f'visible: at least one must be visible and one masked. Choose a ratio between '
          f'{1 / (grid * grid):.3g} and {1 - 1 / (grid * grid):.3g}.')

  @classmethod
  def encoder_patches(cls, config):
    """The visible patches (all of them with encoder_on_all_tokens, the rejected design)."""
    total = num_patches(config.model, config.data.image_size)
    if config.objective.encoder_on_all_tokens:
      return total
    return num_kept(total, config.objective.mask_ratio)

  @classmethod
  def flops_beyond_encoder(cls, config, encoder_tokens, num_labels=None):
    """The decoder: it embeds the encoder's tokens, then runs its blocks and its prediction
    over cls + every patch (mask tokens fill in the dropped ones; the prediction runs on
    the cls position too, then drops it)."""
    del num_labels
    objective, batch = config.objective, config.batch_size
    size = parse_variant(config.model.variant)
    width = objective.decoder_width
    tokens = num_patches(config.model, config.data.image_size) + int(config.model.use_cls_token)
    return {
        'decoder/embed': dense_flops(batch * encoder_tokens, size.width, width),
        **transformer_forward_flops(batch, tokens, width, objective.decoder_depth,
                                    objective.decoder_heads, prefix='decoder'),
        'decoder/predict': dense_flops(batch * tokens, width, size.patch_size ** 2 * 3),
    }

  def __init__(self, config):
    super().__init__(config)
    objective = config.objective
    self.mask_ratio = objective.mask_ratio
    self.norm_pix_loss = objective.norm_pix_loss
    self.model = MAEModel(
        # The parent module names it 'encoder': the subtree later stages take.
        encoder=vit_from_config(config.model),
        decoder_width=objective.decoder_width, decoder_depth=objective.decoder_depth,
        decoder_heads=objective.decoder_heads, dtype=compute_dtype(config.model.dtype),
        encoder_on_all_tokens=objective.encoder_on_all_tokens)

  @property
  def patch_size(self) -> int:
    return self.model.encoder.patch_size

  def init_params(self, rng):
    return self.model.init({'params': rng}, self.dummy_images(), rng, self.mask_ratio)['params']

  def reconstruct(self, params, images, rng):
    """Normalized images -> (predictions (B, L, p*p*3), RandomMask, target patches)."""
    pred, masking = self.model.apply({'params': params}, images, rng, self.mask_ratio)
    target = patchify(images, self.patch_size)
    if self.norm_pix_loss:
      target = normalize_patches(target)
    return pred, masking, target

  def loss(self, params, batch, rng, train=True):
    del train  # MAE masks at evaluation too: the loss is only defined with a mask.
    pred, masking, target = self.reconstruct(params, normalize_images(batch['image']), rng)
    loss = masked_patch_loss(pred, target, masking.mask)
    return loss, {'loss': loss}

  def visualize(self, params, images, rng):
    """Panels for the reconstruction grid, each (B, H, W, 3) in [0, 1].

    'reconstruction' un-normalizes the norm-pix prediction with the TRUE patch
    statistics, as the MAE paper's figures do; that leaks each patch's mean and
    variance, so the normalized target and prediction are shown beside it.
    """
    images = normalize_images(images)
    pred, masking, target = self.reconstruct(params, images, rng)
    pred = pred.astype(jnp.float32)
    patches = patchify(images, self.patch_size)
    if self.norm_pix_loss:
      mean = patches.mean(axis=-1, keepdims=True)
      std = jnp.sqrt(patches.var(axis=-1, keepdims=True, ddof=1) + NORM_PIX_EPSILON)
      reconstructed = pred * std + mean
    else:
      reconstructed = pred
    mask = masking.mask[..., None]
    to_image = lambda p: denormalize_images(unpatchify(p, self.patch_size))
    # Normalized patches are ~N(0, 1): show them as 0.5 +- 0.25 per unit.
    show_normalized = lambda p: jnp.clip(unpatchify(p, self.patch_size) * 0.25 + 0.5, 0, 1)
    return {
        'input': denormalize_images(images),
        'masked': to_image(patches * (1 - mask)),
        'reconstruction': to_image(patches * (1 - mask) + reconstructed * mask),
        'target_normalized': show_normalized(target),
        'prediction_normalized': show_normalized(pred * mask + target * (1 - mask)),
    }
