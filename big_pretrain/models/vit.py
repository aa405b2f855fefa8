"""Vision Transformer encoder shared by every objective.

Pre-LN blocks, fixed 2-D sin-cos position embedding, cls/GAP pooling, optional
`nn.scan` over layers and rematerialisation ('auto' is chosen by the training
loop, see REMAT_AUTO), and attention through jax.nn.dot_product_attention
('auto': cuDNN flash attention on GPUs where it can run, see
big_pretrain/models/attention.py). Every parameter names its axes
('embed', 'mlp', 'heads', 'kv', 'layers') so sharding is decided by the rules
in `big_pretrain.sharding`, not here. Parameters are float32; the compute
dtype comes from the config.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from big_pretrain.models import attention as attention_lib
from big_pretrain.models.patches import patchify, sincos_2d_position_embedding

# (width, depth, heads), from METHODS.md section 1. 'mu' is a tiny size for tests.
_VIT_SIZES = {
    'mu': (64, 2, 4), 'Ti': (192, 12, 3), 'S': (384, 12, 6), 'B': (768, 12, 12),
    'L': (1024, 24, 16), 'H': (1280, 32, 16), 'g': (1408, 40, 16), '2B': (2560, 24, 32),
}
# AIM's trunks (width over depth; heads our choice, head_dim 128).
_AIM_TRUNK_SIZES = {
    '600M': (1536, 24, 12), '1B': (2048, 24, 16), '3B': (3072, 24, 24), '7B': (4096, 32, 32),
}
VIT_SIZES = {**_VIT_SIZES, **_AIM_TRUNK_SIZES}  # config.model.variant's SIZE

# Names of the remat policies a config may choose.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# config.model.remat may also be 'auto': the training loop measures the compiled
# step and picks a policy (big_pretrain/train/remat_choice.py). A model built
# with 'auto' anywhere else (tests, a model built from a config by hand) has
# nothing to measure and runs without remat.
REMAT_AUTO = 'auto'

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

LAYERNORM_EPSILON = 1e-6

# config.model.patch_embed_impl: how pixels become patch tokens (PatchEmbedding). Both
# compute the same linear map with the same parameters.
PATCH_EMBED_IMPLS = ('matmul', 'conv')

# Xavier-uniform over the flattened (fan_in, fan_out) view, as the PyTorch
# references initialise their Linear layers.
def xavier_uniform(in_axis=-2, out_axis=-1):
  return nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis)


@dataclasses.dataclass(frozen=True)
class VitSize:
  width: int
  depth: int
  heads: int
  patch_size: int


def parse_variant(variant: str) -> VitSize:
  """'B/16' -> VitSize(768, 12, 12, 16)."""
  match = re.fullmatch(r'([A-Za-z0-9]+)/(\d+)', variant)
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


def dense(features, axes, dtype, name=None, use_bias=True, kernel_init=None):
  """A Dense layer whose kernel and bias carry logical axis names."""
  return nn.Dense(
      features, dtype=dtype, use_bias=use_bias, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init or xavier_uniform(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def layer_norm(dtype, name=None):
  return nn.LayerNorm(
      epsilon=LAYERNORM_EPSILON, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))


class Projection(nn.Module):
  """Dense layer over several input and/or output axes, its kernel kept in its real shape.

  The first `num_in` kernel axes contract with the trailing axes of x. Xavier
  fans are taken over the flattened (in, out) view, like a PyTorch Linear.
  """
  kernel_shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  num_in: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_axes = tuple(range(self.num_in))
    out_axes = tuple(range(self.num_in, len(self.kernel_shape)))
    kernel = self.param('kernel', nn.with_logical_partitioning(
        xavier_uniform(in_axis=in_axes, out_axis=out_axes), self.axes), self.kernel_shape)
    bias = self.param('bias', nn.with_logical_partitioning(
        nn.initializers.zeros, self.axes[self.num_in:]), self.kernel_shape[self.num_in:])
    contract_x = tuple(range(x.ndim - self.num_in, x.ndim))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((contract_x, in_axes), ((), ())))
    return y + bias.astype(self.dtype)


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


class Attention(nn.Module):
  """Multi-head self-attention over the tokens `masking` allows (attention.TokenMasking).

  `implementation`: 'xla' or 'cudnn', as the stack's attention.plan_attention chose.
  """
  num_heads: int
  dtype: Any = jnp.float32
  implementation: str = 'xla'

  @nn.compact
  def __call__(self, x, masking: attention_lib.TokenMasking | None = None):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    qkv_shape = (width, self.num_heads, head_dim)
    qkv_axes = ('embed', 'heads', 'kv')
    q = Projection(qkv_shape, qkv_axes, dtype=self.dtype, name='query')(x)
    k = Projection(qkv_shape, qkv_axes, dtype=self.dtype, name='key')(x)
    v = Projection(qkv_shape, qkv_axes, dtype=self.dtype, name='value')(x)
    if masking is None:
      masking = attention_lib.TokenMasking()
    out = attention_lib.dot_product_attention(q, k, v, masking, self.implementation)
    return Projection((self.num_heads, head_dim, width), ('heads', 'kv', 'embed'), num_in=2,
                      dtype=self.dtype, name='out')(out)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = dense(self.mlp_dim, ('embed', 'mlp'), self.dtype, name='fc1')(x)
    x = nn.gelu(x, approximate=False)
    return dense(width, ('mlp', 'embed'), self.dtype, name='fc2')(x)


class EncoderBlock(nn.Module):
  """Pre-LN block: x += Attn(LN(x)); x += MLP(LN(x)).

  `num_real_tokens`: the tokens before any padding (attention.pad_tokens); the
  sown block outputs hold only those. None: no padding. `drop_rate`: stochastic
  depth, the probability that an example skips each residual branch (the
  kept ones are scaled by 1 / (1 - rate)); None: never, and no rng is drawn.
  """
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  attention_implementation: str = 'xla'
  num_real_tokens: int | None = None

  @nn.compact
  def __call__(self, x, masking: attention_lib.TokenMasking | None = None, drop_rate=None):
    x = nn.with_logical_constraint(x, ('batch', 'tokens', 'embed'))
    attended = Attention(self.num_heads, self.dtype, self.attention_implementation,
                         name='attention')(layer_norm(self.dtype, name='norm1')(x), masking)
    x = x + self._drop_path(attended, drop_rate)
    x = x + self._drop_path(MlpBlock(self.mlp_dim, self.dtype, name='mlp')(
        layer_norm(self.dtype, name='norm2')(x)), drop_rate)
    # Recorded only when the caller makes 'intermediates' mutable (probes).
    self.sow('intermediates', 'output', x[:, :self.num_real_tokens])
    return x

  def _drop_path(self, branch, drop_rate):
    """The residual branch, dropped per example with probability `drop_rate` (timm's DropPath)."""
    if drop_rate is None:
      return branch
    keep = 1.0 - drop_rate
    kept = jax.random.bernoulli(self.make_rng('dropout'), keep, (branch.shape[0], 1, 1))
    return jnp.where(kept, branch / keep, 0).astype(branch.dtype)


class _ScannedBlock(EncoderBlock):
  """EncoderBlock with the (carry, x) -> (carry, y) signature nn.scan wants."""

  def __call__(self, x, masking=None, drop_rate=None):
    return super().__call__(x, masking, drop_rate), None


def drop_path_rates(drop_path: float, depth: int) -> np.ndarray:
  """Stochastic depth per layer: rising linearly from 0 to `drop_path` (timm's ViT rule)."""
  return np.linspace(0.0, drop_path, depth, dtype=np.float32)


class Transformer(nn.Module):
  """A stack of blocks, unrolled ('block_0', ...) or scanned ('blocks', leading axis = layer).

  `__call__(x, mask=None, key_lengths=None)`: tokens (B, T, D); `mask`
  (B, 1|heads, T, T) bool, True = may attend; `key_lengths` (B,) int32, the
  real tokens of each row when padding trails them (keys past it are never
  attended). Returns the final-LN output. Used by every tower: the ViT, the
  MAE decoder, FLIP's text tower. The attention implementation and any padding
  are chosen here, once for all the blocks (attention.plan_attention).
  `drop_path` > 0: stochastic depth in training (`train=True`; a 'dropout' rng),
  per layer as drop_path_rates gives.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  scan: bool = False
  remat: str = 'none'
  attention_impl: str | None = 'auto'  # see attention.ATTENTION_IMPLS
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x, mask=None, key_lengths=None, train: bool = False):
    # 'auto' not resolved by the training loop: nothing was measured, so no remat.
    remat = 'none' if self.remat == REMAT_AUTO else self.remat
    if remat not in REMAT_POLICIES:
      raise ValueError(f'Unknown remat policy {self.remat!r}; choose from '
                       f'{sorted(REMAT_POLICIES) + [REMAT_AUTO]}.')
    batch, num_tokens, width = x.shape
    plan = attention_lib.plan_attention(
        self.attention_impl, platform=attention_lib.platform_being_traced_for(),
        dtype=self.dtype, batch=batch, num_tokens=num_tokens, num_heads=self.num_heads,
        head_dim=width // self.num_heads, mask_shape=None if mask is None else mask.shape,
        key_lengths=key_lengths is not None)
    attention_lib.log_plan(plan, '/'.join(self.scope.path) or 'transformer')
    x, masking = attention_lib.pad_tokens(plan, x, mask, key_lengths)
    block_kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                        attention_implementation=plan.implementation,
                        num_real_tokens=num_tokens if plan.padded else None)
    block_cls = _ScannedBlock if self.scan else EncoderBlock
    if remat != 'none':
      block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat],
                           prevent_cse=not self.scan)
    drop_rates = (drop_path_rates(self.drop_path, self.depth)
                  if train and self.drop_path > 0 else None)
    if self.scan:
      stack = nn.scan(
          block_cls, variable_axes={'params': 0, 'intermediates': 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast, nn.broadcast if drop_rates is None else 0),
          length=self.depth, metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(**block_kwargs, name='blocks')(
          x, masking, None if drop_rates is None else jnp.asarray(drop_rates))
    else:
      for layer in range(self.depth):
        x = block_cls(**block_kwargs, name=f'block_{layer}')(
            x, masking, None if drop_rates is None else float(drop_rates[layer]))
    return layer_norm(self.dtype, name='norm')(x[:, :num_tokens])


class TransformerTower(nn.Module, kw_only=True):
  """A tower built on one `Transformer` (the ViT, the MAE decoder, the text tower).

  Holds the options the blocks take, keyword-only; a subclass declares `width`,
  `depth` and `num_heads` and builds its blocks with `self.make_transformer()`.
  """
  mlp_ratio: int = 4
  dtype: Any = jnp.float32
  scan: bool = False
  remat: str = 'none'
  attention_impl: str | None = 'auto'  # see attention.ATTENTION_IMPLS

  def make_transformer(self, drop_path: float = 0.0) -> Transformer:
    """The tower's blocks, named 'transformer' (call inside the compact __call__)."""
    return Transformer(self.depth, self.num_heads, self.mlp_ratio * self.width, self.dtype,
                       self.scan, self.remat, self.attention_impl, drop_path,
                       name='transformer')


class VisionTransformer(TransformerTower):
  """ViT encoder.

  `__call__(images, keep_indices=None)`: images are normalised floats
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


def stacked_block_outputs(intermediates) -> jax.Array:
  """The sown block outputs of a Transformer's 'intermediates' -> (depth, B, T, D)."""
  if 'blocks' in intermediates:
    return intermediates['blocks']['output'][0]
  depth = len([k for k in intermediates if k.startswith('block_')])
  return jnp.stack([intermediates[f'block_{i}']['output'][0] for i in range(depth)])


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
