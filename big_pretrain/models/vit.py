"""Vision Transformer encoder shared by every objective.

Pre-LN blocks, fixed 2-D sin-cos position embedding, cls/GAP pooling, optional
`nn.scan` over layers and rematerialisation ('auto' is chosen by the training
loop, see REMAT_AUTO), and attention through jax.nn.dot_product_attention
('auto': cuDNN flash attention on GPUs where it can run, see
choose_attention_implementation). Every parameter names its axes
('embed', 'mlp', 'heads', 'kv', 'layers') so sharding is decided by the rules
in `big_pretrain.sharding`, not here. Parameters are float32; the compute
dtype comes from the config.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import linen as nn

from big_pretrain.models.patches import sincos_2d_position_embedding

# (width, depth, heads), from METHODS.md section 1. 'mu' is a tiny size for tests.
VIT_SIZES = {
    'mu': (64, 2, 4),
    'Ti': (192, 12, 3),
    'S': (384, 12, 6),
    'B': (768, 12, 12),
    'L': (1024, 24, 16),
    'H': (1280, 32, 16),
    'g': (1408, 40, 16),
    '2B': (2560, 24, 32),
    # AIM's trunks (width over depth; heads our choice, head_dim 128).
    '600M': (1536, 24, 12),
    '1B': (2048, 24, 16),
    '3B': (3072, 24, 24),
    '7B': (4096, 32, 32),
}

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

# config.model.attention_impl: 'auto' (cuDNN flash attention where it can run,
# else XLA's), 'xla', or 'cudnn' (errors if cuDNN cannot run these shapes).
# None, from configs written before 'auto', means 'xla'.
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')

LAYERNORM_EPSILON = 1e-6

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


def choose_attention_implementation(requested: str | None, platform: str, dtype) -> str:
  """The `implementation` of jax.nn.dot_product_attention to try for config.model.attention_impl.

  'auto' is 'cudnn' on a GPU with a 16-bit compute dtype (cuDNN's flash
  attention takes only float16/bfloat16), else 'xla'. `platform` is a device
  platform ('gpu', 'cpu', 'tpu'). JAX's own default (None) is always XLA's
  implementation, so GPUs would never get the fused kernel without this.
  """
  if requested is None:
    return 'xla'
  if requested not in ATTENTION_IMPLS:
    raise ValueError(f'Unknown attention_impl {requested!r}; choose from {ATTENTION_IMPLS}.')
  if requested != 'auto':
    return requested
  if platform in ('gpu', 'cuda') and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  return 'xla'


def _platform_being_traced_for() -> str:
  """The platform of the mesh the code is traced under (jax.set_mesh), else JAX's default."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


def cudnn_attention_unsupported_reason(q, k, v, mask) -> str | None:
  """Why cuDNN attention cannot train on arrays of these shapes, or None if it can.

  Traces the forward and backward abstractly (nothing runs): JAX's cuDNN path
  checks its shapes while tracing, and with remat the backward's own check
  would otherwise fire in a later trace, outside any try around the call.
  """
  return _cudnn_unsupported_reason_for(*(
      None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v, mask)))


@functools.cache  # every layer has the same shapes: trace the check once, not per layer
def _cudnn_unsupported_reason_for(q, k, v, mask) -> str | None:
  def forward_and_backward(q, k, v, mask):
    out, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=mask, implementation='cudnn'), q, k, v)
    return vjp(out)

  try:
    jax.eval_shape(forward_and_backward, q, k, v, mask)
  except (NotImplementedError, ValueError, RuntimeError) as error:
    return f'{type(error).__name__}: {error}'
  return None


@functools.cache  # once per distinct reason, not once per layer and retrace
def _log_cudnn_fallback(reason: str) -> None:
  logging.warning(
      "model.attention_impl='auto': cuDNN flash attention cannot run here, so XLA's attention "
      "is used (%s). Set model.attention_impl='xla' to choose it explicitly.", reason)


class Attention(nn.Module):
  """Multi-head self-attention; `mask` (B, 1|heads, T, T) bool, True = may attend."""
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str | None = 'auto'  # see ATTENTION_IMPLS

  @nn.compact
  def __call__(self, x, mask=None):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    qkv_shape = (width, self.num_heads, head_dim)
    qkv_axes = ('embed', 'heads', 'kv')
    q = Projection(qkv_shape, qkv_axes, dtype=self.dtype, name='query')(x)
    k = Projection(qkv_shape, qkv_axes, dtype=self.dtype, name='key')(x)
    v = Projection(qkv_shape, qkv_axes, dtype=self.dtype, name='value')(x)
    implementation = choose_attention_implementation(
        self.attention_impl, _platform_being_traced_for(), self.dtype)
    if implementation == 'cudnn' and self.attention_impl == 'auto':
      reason = cudnn_attention_unsupported_reason(q, k, v, mask)
      if reason is not None:
        _log_cudnn_fallback(reason)
        implementation = 'xla'
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
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
  """Pre-LN block: x += Attn(LN(x)); x += MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  attention_impl: str | None = 'auto'  # see ATTENTION_IMPLS

  @nn.compact
  def __call__(self, x, mask=None):
    x = nn.with_logical_constraint(x, ('batch', 'tokens', 'embed'))
    x = x + Attention(self.num_heads, self.dtype, self.attention_impl, name='attention')(
        layer_norm(self.dtype, name='norm1')(x), mask)
    x = x + MlpBlock(self.mlp_dim, self.dtype, name='mlp')(
        layer_norm(self.dtype, name='norm2')(x))
    # Recorded only when the caller makes 'intermediates' mutable (probes).
    self.sow('intermediates', 'output', x)
    return x


class _ScannedBlock(EncoderBlock):
  """EncoderBlock with the (carry, x) -> (carry, y) signature nn.scan wants."""

  def __call__(self, x, mask=None):
    return super().__call__(x, mask), None


class Transformer(nn.Module):
  """A stack of blocks, unrolled ('block_0', ...) or scanned ('blocks', leading axis = layer).

  Returns the final-LN output. Also used by the MAE decoder.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  scan: bool = False
  remat: str = 'none'
  attention_impl: str | None = 'auto'  # see ATTENTION_IMPLS

  @nn.compact
  def __call__(self, x, mask=None):
    # 'auto' not resolved by the training loop: nothing was measured, so no remat.
    remat = 'none' if self.remat == REMAT_AUTO else self.remat
    if remat not in REMAT_POLICIES:
      raise ValueError(f'Unknown remat policy {self.remat!r}; choose from '
                       f'{sorted(REMAT_POLICIES) + [REMAT_AUTO]}.')
    block_kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                        dtype=self.dtype, attention_impl=self.attention_impl)
    block_cls = _ScannedBlock if self.scan else EncoderBlock
    if remat != 'none':
      block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat],
                           prevent_cse=not self.scan)
    if self.scan:
      stack = nn.scan(
          block_cls, variable_axes={'params': 0, 'intermediates': 0},
          split_rngs={'params': True},
          in_axes=nn.broadcast, length=self.depth,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(**block_kwargs, name='blocks')(x, mask)
    else:
      for layer in range(self.depth):
        x = block_cls(**block_kwargs, name=f'block_{layer}')(x, mask)
    return layer_norm(self.dtype, name='norm')(x)


class VisionTransformer(nn.Module):
  """ViT encoder.

  `__call__(images, keep_indices=None)`: images are normalised floats
  (B, H, W, 3). With `keep_indices` (B, K), only those patches (after the
  position embedding is added) enter the blocks: MAE and FLIP drop the rest
  before any compute is spent on them.

  Returns a dict: 'tokens' (B, [1 +] K, D) after the final LN (cls first when
  present), 'patch_tokens' (without cls), 'pooled' (B, D) per `pool`.

  `remat`: a REMAT_POLICIES name, or 'auto' (no remat here; the training loop
  replaces it with a measured choice). `attention_impl`: 'auto', 'xla' or
  'cudnn' (see ATTENTION_IMPLS); None means 'xla'.
  """
  width: int
  depth: int
  num_heads: int
  patch_size: int
  mlp_ratio: int = 4
  use_cls_token: bool = True
  pool: str = 'cls'  # 'cls' | 'gap'
  posemb: str = 'sincos'  # 'sincos' (fixed) | 'learned'
  dtype: Any = jnp.float32
  scan: bool = False
  remat: str = 'none'
  attention_impl: str | None = 'auto'  # see ATTENTION_IMPLS

  @nn.compact
  def __call__(self, images, keep_indices=None, attention_mask=None):
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f'Image size {images.shape[1:3]} is not a multiple of the patch size {p}.')
    x = nn.Conv(
        self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, name='patch_embed',
        kernel_init=nn.with_logical_partitioning(
            xavier_uniform(in_axis=(0, 1, 2), out_axis=3), (None, None, None, 'embed')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
    )(images.astype(self.dtype))
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, self.width)
    if self.posemb == 'sincos':
      posemb = jnp.asarray(sincos_2d_position_embedding(self.width, grid_h, grid_w))[None]
    elif self.posemb == 'learned':
      posemb = self.param('pos_embedding', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, 'tokens', 'embed')),
          (1, grid_h * grid_w, self.width))
    else:
      raise ValueError(f"Unknown posemb {self.posemb!r}; choose 'sincos' or 'learned'.")
    x = x + posemb.astype(self.dtype)
    if keep_indices is not None:
      x = jnp.take_along_axis(x, keep_indices[..., None], axis=1)
    if self.use_cls_token:
      cls = self.param('cls_token', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, None, 'embed')), (1, 1, self.width))
      # The cls position embedding is zero (MAE reference), so it is not added.
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(self.dtype), x], 1)
    x = Transformer(
        self.depth, self.num_heads, self.mlp_ratio * self.width, self.dtype,
        self.scan, self.remat, self.attention_impl, name='transformer')(x, attention_mask)
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
  """Builds the encoder from `config.model` (variant, pool, dtype, scan, remat, ...)."""
  size = parse_variant(model_config.variant)
  return VisionTransformer(
      width=size.width, depth=size.depth, num_heads=size.heads, patch_size=size.patch_size,
      use_cls_token=model_config.use_cls_token, pool=model_config.pool,
      posemb=model_config.posemb, dtype=compute_dtype(model_config.dtype),
      scan=model_config.scan, remat=model_config.remat,
      attention_impl=model_config.attention_impl)


def compute_dtype(name: str):
  dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  if name not in dtypes:
    raise ValueError(f'Unknown compute dtype {name!r}; choose from {sorted(dtypes)}.')
  return dtypes[name]
