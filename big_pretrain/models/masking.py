"""Per-example random patch masking (MAE, and FLIP's patch dropping)."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class RandomMask:
  keep_indices: jax.Array  # (B, len_keep) int32: visible patches, in shuffled order.
  ids_restore: jax.Array   # (B, L) int32: unshuffles [visible, masked] to raster order.
  mask: jax.Array          # (B, L) float32: 1 = removed, 0 = visible, raster order.


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """floor(L * (1 - r)), as the MAE reference computes it."""
  return int(num_patches * (1 - mask_ratio))


def random_masking(rng: jax.Array, batch_size: int, num_patches: int,
                   mask_ratio: float) -> RandomMask:
  """MAE's argsort masking: noise ~ U[0,1]^L; keep the first len_keep of argsort(noise)."""
  len_keep = num_kept(num_patches, mask_ratio)
  noise = jax.random.uniform(rng, (batch_size, num_patches))
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  shuffled_mask = (jnp.arange(num_patches) >= len_keep).astype(jnp.float32)
  mask = jnp.take_along_axis(
      jnp.broadcast_to(shuffled_mask, (batch_size, num_patches)), ids_restore, axis=1)
  return RandomMask(ids_shuffle[:, :len_keep], ids_restore, mask)
