"""Pixels <-> patches, image normalization and fixed sin-cos position embeddings.

Pure functions shared by the encoder, the MAE decoder and the visualisations.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from einops import rearrange

# Inputs arrive as uint8 (4x less host->device traffic) and are normalized on
# device with the ImageNet statistics, as MAE, FLIP and AIM do.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: jnp.ndarray) -> jnp.ndarray:
  """uint8 [0, 255] (or float [0, 1] when not uint8) -> ImageNet-normalized float32."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def denormalize_images(images: jnp.ndarray) -> jnp.ndarray:
  """Inverse of `normalize_images`, to float [0, 1] (clipped) for display."""
  images = images * jnp.asarray(IMAGENET_STD) + jnp.asarray(IMAGENET_MEAN)
  return jnp.clip(images, 0.0, 1.0)


def patchify(images: jnp.ndarray, patch_size: int) -> jnp.ndarray:
  """(B, H, W, C) -> (B, L, p*p*C), patches in raster order, pixels in (p, q, c) order.

  Matches the MAE reference's (h, w, p, q, c) layout.
  """
  return rearrange(images, 'b (h p) (w q) c -> b (h w) (p q c)',
                   p=patch_size, q=patch_size)


def unpatchify(patches: jnp.ndarray, patch_size: int, channels: int = 3) -> jnp.ndarray:
  """(B, L, p*p*C) -> (B, H, W, C); the inverse of `patchify` for square grids."""
  grid = int(round(np.sqrt(patches.shape[1])))
  if grid * grid != patches.shape[1]:
    raise ValueError(f'unpatchify needs a square patch grid, got {patches.shape[1]} patches.')
  return rearrange(patches, 'b (h w) (p q c) -> b (h p) (w q) c',
                   h=grid, w=grid, p=patch_size, q=patch_size, c=channels)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.einsum('m,d->md', positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_position_embedding(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2-D sin-cos embedding, (grid_h * grid_w, dim), raster order.

  As in the MAE reference: half the channels encode the column, half the row.
  """
  if dim % 4:
    raise ValueError(f'sin-cos position embedding needs a width divisible by 4, got {dim}.')
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')
  embedding = np.concatenate(
      [_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
  return embedding.astype(np.float32)
