"""The transformer layers every tower is built of: the ViT, MAE's decoder, FLIP's text tower.

Pre-LN blocks (x += Attn(LN(x)); x += MLP(LN(x))), a stack of them unrolled
('block_0', 'block_1', ...) or under `nn.scan` ('blocks', the layer on each
leaf's leading axis), optional rematerialisation, stochastic depth, and
attention through jax.nn.dot_product_attention ('auto': cuDNN flash attention
on GPUs where it can run, see attention.py). Every parameter names its axes
('embed', 'mlp', 'heads', 'kv', 'layers') so sharding is decided by the rules
in `big_pretrain.sharding`, not here. Parameters are float32; the compute
dtype is the caller's.

The two layouts hold the same parameters: `scanned_to_unrolled` and
`unrolled_to_scanned` convert a checkpoint's tree from one to the other.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from big_pretrain.errors import CheckpointMismatchError
from big_pretrain.models import attention as attention_lib

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

LAYERNORM_EPSILON = 1e-6
# The MLP's width over the model's, in every tower here.
MLP_RATIO = 4

# How a stack names its parameters: block_<i> per layer when unrolled, one 'blocks' whose
# leaves have a leading layer axis when scanned, and 'norm', the final LayerNorm.
SCANNED_BLOCKS = 'blocks'
TOWER_STACK = 'transformer'  # a TransformerTower's stack
FINAL_NORM = 'norm'
_BLOCK_NAME = re.compile(r'^block_(\d+)$')


def block_name(layer: int) -> str:
  """The name of an unrolled stack's layer `layer`: 'block_3'."""
  return f'block_{layer}'

# Xavier-uniform over the flattened (fan_in, fan_out) view, as the PyTorch
# references initialize their Linear layers.
def xavier_uniform(in_axis=-2, out_axis=-1):
  return nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis)


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
      x, _ = stack(**block_kwargs, name=SCANNED_BLOCKS)(
          x, masking, None if drop_rates is None else jnp.asarray(drop_rates))
    else:
      for layer in range(self.depth):
        x = block_cls(**block_kwargs, name=block_name(layer))(
            x, masking, None if drop_rates is None else float(drop_rates[layer]))
    return layer_norm(self.dtype, name=FINAL_NORM)(x[:, :num_tokens])


class TransformerTower(nn.Module, kw_only=True):
  """A tower built on one `Transformer` (the ViT, the MAE decoder, the text tower).

  Holds the options the blocks take, keyword-only; a subclass declares `width`,
  `depth` and `num_heads` and builds its blocks with `self.make_transformer()`.
  """
  mlp_ratio: int = MLP_RATIO
  dtype: Any = jnp.float32
  scan: bool = False
  remat: str = 'none'
  attention_impl: str | None = 'auto'  # see attention.ATTENTION_IMPLS

  def make_transformer(self, drop_path: float = 0.0) -> Transformer:
    """The tower's blocks, named 'transformer' (call inside the compact __call__)."""
    return Transformer(self.depth, self.num_heads, self.mlp_ratio * self.width, self.dtype,
                       self.scan, self.remat, self.attention_impl, drop_path,
                       name=TOWER_STACK)


def stacked_block_outputs(intermediates) -> jax.Array:
  """The sown block outputs of a Transformer's 'intermediates' -> (depth, B, T, D)."""
  if SCANNED_BLOCKS in intermediates:
    return intermediates[SCANNED_BLOCKS]['output'][0]
  depth = len([k for k in intermediates if _BLOCK_NAME.match(k)])
  return jnp.stack([intermediates[block_name(i)]['output'][0] for i in range(depth)])




# --- The two layouts of a stack's parameters -----------------------------------

def scanned_to_unrolled(tree: dict) -> dict:
  """{'blocks': leaves with a leading layer axis} -> {'block_0': ..., 'block_1': ...}, recursively."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key == SCANNED_BLOCKS:
      depth = jax.tree_util.tree_leaves(value)[0].shape[0]
      for layer in range(depth):
        out[block_name(layer)] = jax.tree_util.tree_map(lambda x, i=layer: x[i], value)
    else:
      out[key] = scanned_to_unrolled(value)
  return out


def unrolled_to_scanned(tree: dict) -> dict:
  """The inverse of `scanned_to_unrolled`."""
  if not isinstance(tree, dict):
    return tree
  layers = sorted((int(m.group(1)), k) for k in tree if (m := _BLOCK_NAME.match(k)))
  out = {k: unrolled_to_scanned(v) for k, v in tree.items() if not _BLOCK_NAME.match(k)}
  if layers:
    if [i for i, _ in layers] != list(range(len(layers))):
      raise CheckpointMismatchError(f'Layers {[k for _, k in layers]} are not 0..N-1.')
    out[SCANNED_BLOCKS] = jax.tree_util.tree_map(
        lambda *xs: np.stack(xs), *[tree[k] for _, k in layers])
  return out


def _is_scanned(tree) -> bool:
  if not isinstance(tree, dict):
    return False
  return SCANNED_BLOCKS in tree or any(_is_scanned(v) for v in tree.values())


def _is_unrolled(tree) -> bool:
  if not isinstance(tree, dict):
    return False
  return (any(_BLOCK_NAME.match(k) for k in tree)
          or any(_is_unrolled(v) for v in tree.values()))


def match_layer_layout(source: dict, target_like: dict) -> dict:
  """Converts `source` to the scanned/unrolled layout of `target_like`."""
  if _is_scanned(source) and _is_unrolled(target_like):
    return scanned_to_unrolled(source)
  if _is_unrolled(source) and _is_scanned(target_like):
    return unrolled_to_scanned(source)
  return source


# --- Analytic FLOPs (train/mfu.py: only matmuls count, 2 * m * n * k each) ---------

def dense_flops(rows: float, fan_in: int, fan_out: int) -> float:
  """2 * m * n * k: `rows` vectors through a (fan_in, fan_out) matmul."""
  return 2.0 * rows * fan_in * fan_out


def transformer_forward_flops(batch: int, tokens: int, width: int, depth: int, heads: int,
                              prefix: str, mlp_dim: int | None = None) -> dict[str, float]:
  """Forward matmul FLOPs of `depth` pre-LN blocks over (batch, tokens, width), by part,
  each named '<prefix>/<part>'.

  Per block: q, k, v and out projections (width <-> heads * head_dim), the
  scores QK^T and the values AV (tokens x tokens per head, dense: a mask does
  not remove them), fc1 and fc2.
  """
  mlp_dim = MLP_RATIO * width if mlp_dim is None else mlp_dim
  inner = heads * (width // heads)  # heads * head_dim, as Attention builds its kernels
  rows = batch * tokens
  return {
      f'{prefix}/attention_projections': depth * 4 * dense_flops(rows, width, inner),
      f'{prefix}/attention_scores': depth * 2 * dense_flops(rows, inner, tokens),  # QK^T, AV
      f'{prefix}/mlp': depth * (dense_flops(rows, width, mlp_dim)
                               + dense_flops(rows, mlp_dim, width)),
  }
