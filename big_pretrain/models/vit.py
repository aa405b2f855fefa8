"""The Vision Transformer encoder shared by every objective, and its checkpoint layout.

Patches embedded by one matmul (or a strided convolution), a fixed 2-D sin-cos
(or learned) position embedding, an optional cls token, the blocks of
transformer.py, and cls or GAP pooling. `vit_from_config` builds it from
`config.model`. Every objective holds it as params['encoder'] (ENCODER), so
checkpoints transfer between objectives; what a checkpoint's encoder must go
through to fit another one (scanned <-> unrolled layers, a learned position
embedding resampled to a new patch grid) is `adapt_encoder_params`, and the
layer each encoder parameter belongs to (layer-wise lr decay, partial
fine-tuning) is `encoder_layer`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from big_pretrain import schema
from big_pretrain.errors import CheckpointMismatchError, ConfigError
from big_pretrain.models import transformer
from big_pretrain.models.attention import ATTENTION_IMPLS
from big_pretrain.models.patches import patchify, sincos_2d_position_embedding
from big_pretrain.models.transformer import (REMAT_AUTO, REMAT_POLICIES, TransformerTower,
                                             xavier_uniform)

# Every objective holds its ViT as params[ENCODER] (and as `model.encoder`): the subtree
# probes read, and init_from takes by default.
ENCODER = 'encoder'
# The ViT's own parameters, before its blocks (layer 0 for layer-wise lr decay).
_EMBEDDINGS = ('patch_embed', 'cls_token', 'pos_embedding')

# (width, depth, heads), docs/methods.md section 1. 'mu' is a tiny size for tests.
_VIT_SIZES = {
    'mu': (64, 2, 4), 'Ti': (192, 12, 3), 'S': (384, 12, 6), 'B': (768, 12, 12),
    'L': (1024, 24, 16), 'H': (1280, 32, 16), 'g': (1408, 40, 16), '2B': (2560, 24, 32),
    '6.5B': (4096, 32, 32),  # MAWS's largest (MLP 16384)
}
# AIM's trunks (width over depth; heads our choice, head_dim 128).
_AIM_TRUNK_SIZES = {
    '600M': (1536, 24, 12), '1B': (2048, 24, 16), '3B': (3072, 24, 24), '7B': (4096, 32, 32),
}
VIT_SIZES = {**_VIT_SIZES, **_AIM_TRUNK_SIZES}  # config.model.variant's SIZE

# config.model.scan may also be 'auto' (the default): stacks up to UNROLLED_MAX_DEPTH
# layers unrolled, deeper ones scanned. A scanned stack is a while loop: XLA's GPU
# command buffers (CUDA graphs) leave WHILE out by default in jax 0.11, and its
# condition goes to the host every layer; on a CPU the unrolled ViT-L/16 step ran
# 1.4x faster with 26% less memory (benchmarks/README.md). What scanning buys is a
# compile time and program size that stay flat as depth grows, which the deep sizes
# (H/14: 32 layers, g/14: 40, 7B: 32) need most. benchmarks/gpu_side_by_side.sh times
# both on a GPU, with and without WHILE in the command buffers.
SCAN_AUTO = 'auto'
UNROLLED_MAX_DEPTH = 24

# config.model.patch_embed_impl: how pixels become patch tokens (PatchEmbedding). Both
# compute the same linear map with the same parameters.
PATCH_EMBED_IMPLS = ('matmul', 'conv')

@dataclasses.dataclass(frozen=True)
class VitSize:
  width: int
  depth: int
  heads: int
  patch_size: int


def parse_variant(variant: str) -> VitSize:
  """'B/16' -> VitSize(768, 12, 12, 16)."""
  match = re.fullmatch(r'([A-Za-z0-9.]+)/(\d+)', variant)
  if not match or match.group(1) not in VIT_SIZES:
    raise ValueError(
        f'Unknown ViT variant {variant!r}: expected SIZE/PATCH with SIZE one of '
        f'{sorted(VIT_SIZES)}, e.g. "B/16".')
  width, depth, heads = VIT_SIZES[match.group(1)]
  return VitSize(width, depth, heads, int(match.group(2)))


def scan_layers(scan: bool | str, depth: int) -> bool:
  """Whether a `depth`-layer encoder's stacks run under nn.scan: config.model.scan, whose
  'auto' scans only encoders deeper than UNROLLED_MAX_DEPTH (see SCAN_AUTO)."""
  if scan == SCAN_AUTO:
    return depth > UNROLLED_MAX_DEPTH
  if not isinstance(scan, bool):
    raise ValueError(f'model.scan={scan!r}: choose True, False or {SCAN_AUTO!r}.')
  return scan


class PatchEmbedding(nn.Module):
  """Pixels (B, H, W, C) -> one token per p x p patch (B, L, D), or per kept patch (B, K, D).

  'matmul': patchify (a reshape), keep only the `keep_indices` patches, then one matmul
  with the kernel viewed as (p*p*C, D). MAE and FLIP embed only their visible patches
  this way (the MAE reference embeds all 196 and then drops 75% of them).
  'conv': a strided convolution over every patch, then the kept tokens gathered; the
  same numbers up to float rounding, kept to measure against (benchmarks/step_speed.py).

  The parameters are nn.Conv's, same names, shapes, init and rng: kernel (p, p, C, D),
  whose (p, q, c) order is patchify's, and bias (D,). Checkpoints, init_from and the
  scanned/unrolled conversions see no difference.
  """
  width: int
  patch_size: int
  dtype: Any = jnp.float32
  implementation: str = 'matmul'

  @nn.compact
  def __call__(self, images, keep_indices=None):
    if self.implementation not in PATCH_EMBED_IMPLS:
      raise ValueError(f'Unknown patch embedding {self.implementation!r}; choose from '
                       f'{PATCH_EMBED_IMPLS}.')
    p, channels = self.patch_size, images.shape[-1]
    kernel = self.param('kernel', nn.with_logical_partitioning(
        xavier_uniform(in_axis=(0, 1, 2), out_axis=3), (None, None, None, 'embed')),
        (p, p, channels, self.width))
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                      (self.width,))
    images, kernel = images.astype(self.dtype), kernel.astype(self.dtype)
    if self.implementation == 'conv':
      tokens = jax.lax.conv_general_dilated(
          images, kernel, window_strides=(p, p), padding='VALID',
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      tokens = tokens.reshape(images.shape[0], -1, self.width)
      if keep_indices is not None:
        tokens = jnp.take_along_axis(tokens, keep_indices[..., None], axis=1)
    else:
      patches = patchify(images, p)
      if keep_indices is not None:
        patches = jnp.take_along_axis(patches, keep_indices[..., None], axis=1)
      tokens = patches @ kernel.reshape(p * p * channels, self.width)
    return tokens + bias.astype(self.dtype)


class VisionTransformer(TransformerTower):
  """ViT encoder.

  `__call__(images, keep_indices=None)`: images are normalized floats
  (B, H, W, 3). With `keep_indices` (B, K), only those patches (after the
  position embedding is added) enter the blocks: MAE and FLIP drop the rest
  before any compute is spent on them.

  Returns a dict: 'tokens' (B, [1 +] K, D) after the final LN (cls first when
  present), 'patch_tokens' (without cls), 'pooled' (B, D) per `pool`.

  `remat`: a REMAT_POLICIES name, or 'auto' (no remat here; the training loop
  replaces it with a measured choice). `attention_impl`: 'auto', 'xla' or
  'cudnn' (see attention.ATTENTION_IMPLS); None means 'xla'. `drop_path`:
  stochastic depth (fine-tuning), active only with `train=True`.
  """
  width: int
  depth: int
  num_heads: int
  patch_size: int
  use_cls_token: bool = True
  pool: str = 'cls'  # 'cls' | 'gap'
  posemb: str = 'sincos'  # 'sincos' (fixed) | 'learned'
  drop_path: float = 0.0
  patch_embed_impl: str = 'matmul'  # see PatchEmbedding

  @nn.compact
  def __call__(self, images, keep_indices=None, attention_mask=None, train: bool = False):
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f'Image size {images.shape[1:3]} is not a multiple of the patch size {p}.')
    batch, grid_h, grid_w = images.shape[0], images.shape[1] // p, images.shape[2] // p
    # Only the kept patches are embedded; their position embeddings are gathered alike.
    x = PatchEmbedding(self.width, p, self.dtype, self.patch_embed_impl,
                       name='patch_embed')(images, keep_indices)
    if self.posemb == 'sincos':
      posemb = jnp.asarray(sincos_2d_position_embedding(self.width, grid_h, grid_w))
    elif self.posemb == 'learned':
      posemb = self.param('pos_embedding', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, 'tokens', 'embed')),
          (1, grid_h * grid_w, self.width))[0]
    else:
      raise ValueError(f"Unknown posemb {self.posemb!r}; choose 'sincos' or 'learned'.")
    if keep_indices is not None:
      posemb = jnp.take(posemb, keep_indices, axis=0)  # (B, K, D)
    x = x + posemb.astype(self.dtype)
    if self.use_cls_token:
      cls = self.param('cls_token', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, None, 'embed')), (1, 1, self.width))
      # The cls position embedding is zero (MAE reference), so it is not added.
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(self.dtype), x], 1)
    x = self.make_transformer(self.drop_path)(x, attention_mask, train=train)
    patch_tokens = x[:, 1:] if self.use_cls_token else x
    if self.pool == 'cls':
      if not self.use_cls_token:
        raise ValueError("pool='cls' needs use_cls_token=True.")
      pooled = x[:, 0]
    elif self.pool == 'gap':
      pooled = patch_tokens.mean(axis=1)
    else:
      raise ValueError(f"Unknown pool {self.pool!r}; choose 'cls' or 'gap'.")
    return {'tokens': x, 'patch_tokens': patch_tokens, 'pooled': pooled}


def _is_variant(variant) -> bool:
  try:
    parse_variant(variant)
  except (TypeError, ValueError):
    return False
  return True


# config.model: the encoder every objective shares.
MODEL_KEYS = schema.Group(
    'the ViT encoder every objective shares',
    variant=schema.Key('B/16', schema.Rule(
        _is_variant, f'must be SIZE/PATCH with SIZE one of {sorted(VIT_SIZES)}, e.g. "B/16"'),
        'the ViT size and patch size: B/16 is width 768, 12 blocks of 12 heads, 16x16 patches'),
    use_cls_token=schema.Key(True, schema.BOOLEAN, 'prepend a learned cls token'),
    pool=schema.Key('cls', schema.one_of('cls', 'gap'),
                    "the pooled feature: the cls token, or the patch tokens' mean (gap)"),
    posemb=schema.Key('sincos', schema.one_of('sincos', 'learned'),
                      'the position embedding: fixed 2-D sin-cos, or learned'),
    dtype=schema.Key('float32', schema.one_of('float32', 'bfloat16'),
                     'the compute dtype; parameters stay float32'),
    scan=schema.Key(
        SCAN_AUTO, schema.Rule(
            lambda v: isinstance(v, bool) or v == SCAN_AUTO,
            f'choose True, False or {SCAN_AUTO!r}. (A model config copied with '
            'copy_and_resolve_references keeps its value as a string, so a command-line True '
            'arrives as the text; set it in the config file instead.)'),
        f"the layers under nn.scan: {SCAN_AUTO!r} unrolls up to {UNROLLED_MAX_DEPTH} layers "
        'and scans deeper encoders; the stage records the layout chosen', type=object),
    remat=schema.Key(
        REMAT_AUTO, schema.one_of(REMAT_AUTO, *REMAT_POLICIES),
        f'what the backward pass recomputes; {REMAT_AUTO!r}: the least remat whose compiled '
        'step fits the device, measured when the stage starts (none on a CPU)'),
    attention_impl=schema.Key(
        'auto', schema.Rule(lambda v: v is None or v in ATTENTION_IMPLS,
                            f'choose one of {ATTENTION_IMPLS} (or None: xla)'),
        "the attention kernel; 'auto': cuDNN flash attention on a GPU with a 16-bit dtype "
        "where cuDNN supports the shapes, else XLA's", type=str),
    drop_path=schema.Key(0.0, schema.UNIT_FRACTION,
                         'stochastic depth in training, rising linearly over the layers to '
                         'this rate (fine-tuning: 0.1 B, 0.2 L, 0.3 H); 0: off'),
    patch_embed_impl=schema.Key(
        'matmul', schema.one_of(*PATCH_EMBED_IMPLS),
        "how pixels become patch tokens: 'matmul' embeds only the visible patches; 'conv' "
        'convolves every patch, then keeps the visible ones (same parameters, same math)'),
)


def num_patches(model_config, image_size: int) -> int:
  """The patches of an image_size x image_size image."""
  return (image_size // parse_variant(model_config.variant).patch_size) ** 2


def vit_forward_flops(model_config, batch: int, patches_seen: int) -> dict[str, float]:
  """The encoder's forward matmul FLOPs, by part ('encoder/mlp', ...), when its blocks see
  `patches_seen` patches per example (plus the cls token): the patch embedding of those
  patches only, then the blocks."""
  size = parse_variant(model_config.variant)
  tokens = patches_seen + int(model_config.use_cls_token)
  parts = {f'{ENCODER}/patch_embed': transformer.dense_flops(
      batch * patches_seen, size.patch_size ** 2 * 3, size.width)}
  parts.update(transformer.transformer_forward_flops(batch, tokens, size.width, size.depth,
                                                     size.heads, prefix=ENCODER))
  return parts


def check_fits_images(model_config, image_size: int, path: str) -> None:
  """Raises ConfigError when `image_size` is not a whole number of the variant's patches."""
  patch = parse_variant(model_config.variant).patch_size
  if image_size % patch:
    raise ConfigError(
        f'{path}.data.image_size={image_size} is not a multiple of the patch size {patch} of '
        f'{path}.model.variant={model_config.variant!r}: use e.g. '
        f'{max(patch, image_size // patch * patch)} or {(image_size // patch + 1) * patch}.')


def vit_from_config(model_config) -> VisionTransformer:
  """Builds the encoder from `config.model` (variant, pool, dtype, scan, remat, ...).

  Its `scan` is the resolved choice (scan_layers); the objective's other stacks (MAE's
  decoder, FLIP's text tower) follow it, so one flag decides every layout.
  """
  size = parse_variant(model_config.variant)
  return VisionTransformer(
      width=size.width, depth=size.depth, num_heads=size.heads, patch_size=size.patch_size,
      use_cls_token=model_config.use_cls_token, pool=model_config.pool,
      posemb=model_config.posemb, dtype=compute_dtype(model_config.dtype),
      scan=scan_layers(model_config.scan, size.depth), remat=model_config.remat,
      attention_impl=model_config.attention_impl,
      drop_path=model_config.drop_path,
      patch_embed_impl=model_config.patch_embed_impl)


def compute_dtype(name: str):
  dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  if name not in dtypes:
    raise ValueError(f'Unknown compute dtype {name!r}; choose from {sorted(dtypes)}.')
  return dtypes[name]


# --- The encoder's parameters by layer, and fitting a checkpoint's encoder -----------------

def encoder_block_prefix(layer: int) -> str:
  """The path prefix of the unrolled encoder's block `layer`: 'encoder/transformer/block_3/'."""
  return f'{ENCODER}/{transformer.TOWER_STACK}/{transformer.block_name(layer)}/'


def encoder_final_norm_prefix() -> str:
  return f'{ENCODER}/{transformer.TOWER_STACK}/{transformer.FINAL_NORM}/'


_ENCODER_BLOCK = re.compile(rf'^{ENCODER}/{transformer.TOWER_STACK}/block_(\d+)/')
_SCANNED_ENCODER_BLOCKS = re.compile(
    rf'^{ENCODER}/{transformer.TOWER_STACK}/{transformer.SCANNED_BLOCKS}/')
_ENCODER_EMBEDDINGS = re.compile(rf'^{ENCODER}/({"|".join(_EMBEDDINGS)})(/|$)')


def encoder_layer(path: str, depth: int) -> int | None:
  """The layer of a parameter at `path` ('encoder/transformer/block_0/mlp/fc1/kernel'), as
  MAE's get_layer_id_for_vit counts: 0 for the patch embedding and tokens, i + 1 for block
  i, depth + 1 for everything after the blocks (the final norm, any head); None for a
  scanned stack's leaves, whose leading axis is the layer."""
  if _ENCODER_EMBEDDINGS.search(path):
    return 0
  if match := _ENCODER_BLOCK.search(path):
    return int(match.group(1)) + 1
  if _SCANNED_ENCODER_BLOCKS.search(path):
    return None
  return depth + 1


def encoder_depth(paths_and_shapes) -> int:
  """The number of encoder blocks, from (path, shape) pairs of a parameter tree's leaves."""
  depth = 0
  for path, shape in paths_and_shapes:
    if match := _ENCODER_BLOCK.search(path):
      depth = max(depth, int(match.group(1)) + 1)
    elif _SCANNED_ENCODER_BLOCKS.search(path):
      depth = max(depth, shape[0])
  return depth


def resample_position_embedding(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """(1, gh*gw, D) learned embedding -> (1, num_tokens, D) by bilinear resizing of the grid.

  A constant embedding stays constant; same size is returned unchanged.
  """
  old_tokens = posemb.shape[1]
  if old_tokens == num_tokens:
    return posemb
  old_grid, new_grid = int(round(np.sqrt(old_tokens))), int(round(np.sqrt(num_tokens)))
  if old_grid ** 2 != old_tokens or new_grid ** 2 != num_tokens:
    raise CheckpointMismatchError(
        f'pos_embedding: cannot resample {old_tokens} tokens to {num_tokens}: '
        'only square patch grids are supported.')
  grid = posemb.reshape(old_grid, old_grid, -1)
  resized = jax.image.resize(grid, (new_grid, new_grid, grid.shape[-1]), method='bilinear')
  logging.info('Resampled pos_embedding from a %dx%d to a %dx%d grid.',
               old_grid, old_grid, new_grid, new_grid)
  return np.asarray(resized, posemb.dtype).reshape(1, num_tokens, -1)


def _resample_position_embeddings(source: dict, target_like: dict) -> dict:
  if not isinstance(source, dict):
    return source
  out = {}
  for key, value in source.items():
    target_value = target_like.get(key) if isinstance(target_like, dict) else None
    if key == 'pos_embedding' and target_value is not None:
      out[key] = resample_position_embedding(value, target_value.shape[1])
    else:
      out[key] = _resample_position_embeddings(value, target_value)
  return out


def fit_layout(source: dict, target_like: dict) -> dict:
  """A checkpoint's subtree (numpy) in the layout of `target_like`: its stacks scanned or
  unrolled as the target's are, a learned position embedding resampled to the target's
  patch grid. Shapes are not checked here."""
  return _resample_position_embeddings(transformer.match_layer_layout(source, target_like),
                                       target_like)
