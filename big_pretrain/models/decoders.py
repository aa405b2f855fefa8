"""The pixel decoders: MAE's light transformer that reconstructs every patch (MAEDecoder), and
AIM's head that predicts each next patch (AIMHead)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from big_pretrain.models.patches import sincos_2d_position_embedding
from big_pretrain.models.transformer import MLP_RATIO, MlpBlock, TransformerTower, dense, layer_norm


class MAEDecoder(TransformerTower):
  """Encoded visible tokens (cls first, if any) -> per-patch pixel predictions (B, L, p*p*3).

  dense D -> width; append (L - K) copies of one learned mask token; unshuffle
  with ids_restore; add the fixed sin-cos decoder position embedding; blocks;
  LN; dense -> p*p*3; drop cls. The blocks' options: `TransformerTower`'s.
  """
  width: int
  depth: int
  num_heads: int
  patch_dim: int
  num_prefix_tokens: int = 1  # 1 when the encoder prepends a cls token, else 0

  @nn.compact
  def __call__(self, encoded, ids_restore, grid_hw: tuple[int, int]):
    batch, num_patches = ids_restore.shape
    x = dense(self.width, ('embed', None), self.dtype, name='embed')(encoded)
    mask_token = self.param('mask_token', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, None)), (1, 1, self.width))
    prefix, visible = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
    num_masked = num_patches - visible.shape[1]
    patches = jnp.concatenate(
        [visible, jnp.broadcast_to(mask_token, (batch, num_masked, self.width)).astype(x.dtype)],
        axis=1)
    patches = jnp.take_along_axis(patches, ids_restore[..., None], axis=1)
    posemb = sincos_2d_position_embedding(self.width, *grid_hw)
    patches = patches + jnp.asarray(posemb, x.dtype)[None]
    x = jnp.concatenate([prefix, patches], axis=1)
    x = self.make_transformer()(x)
    pred = dense(self.patch_dim, ('embed', None), self.dtype, name='predict')(x)
    return pred[:, self.num_prefix_tokens:]


class AIMHead(nn.Module):
  """AIM's prediction head: per-patch MLP blocks (no attention), then pixels.

  dense D -> width; `depth` residual blocks x += MLP(LN(x)); LN; dense -> p*p*3.
  Each patch is processed independently, so the head cannot look ahead.
  """
  width: int
  depth: int
  patch_dim: int
  mlp_ratio: int = MLP_RATIO
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = dense(self.width, ('embed', None), self.dtype, name='embed')(x)
    for block in range(self.depth):
      x = x + MlpBlock(self.mlp_ratio * self.width, self.dtype, name=f'mlp_{block}')(
          layer_norm(self.dtype, name=f'norm_{block}')(x))
    x = layer_norm(self.dtype, name='norm')(x)
    return dense(self.patch_dim, ('embed', None), self.dtype, name='predict')(x)
