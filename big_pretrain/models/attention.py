"""How every attention of a Transformer stack runs: which kernel, on how many tokens, logged once.

`plan_attention` decides, once per stack and shape, between cuDNN's fused
(flash) attention and XLA's unfused one, and the token count the stack runs
on. JAX's default implementation (None) is always XLA's, so GPUs get the fused
kernel only when asked for it ('auto' asks on a GPU with a 16-bit dtype).

Padding to a length the kernel takes: in training JAX refuses cuDNN attention
for any odd sequence length, ViT's 197 tokens among them, because its forward
rule passes a placeholder bias and cuDNN needs even lengths with a bias
(jax/_src/cudnn/fused_attention_stablehlo.py, check_is_flash_attention). A
stack planned for cuDNN therefore pads its tokens once, on entry, to a
multiple of CUDNN_LENGTH_MULTIPLE, gives every block the real lengths
(query_seq_lengths / key_value_seq_lengths), and drops the padding on exit:
padded keys are never attended and padded queries' outputs are discarded, so
outputs and gradients are those of the unpadded stack. Key padding that the
caller has (FLIP's captions) is given as lengths too: cuDNN refuses a
(B, 1, 1, T) padding mask (jax-ml/jax#28974). AIM's prefix-causal mask goes
in as a (B, 1, T, T) mask, which cuDNN takes as a bias at even lengths.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from absl import logging
from flax import struct

# config.model.attention_impl: 'auto' (cuDNN flash attention where it can run,
# else XLA's), 'xla', or 'cudnn' (errors if cuDNN cannot run these shapes).
# None, from configs written before 'auto', means 'xla'.
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')

# cuDNN needs even lengths in training (see above). (choice) We pad to the
# smallest length that passes: every padded token also costs its share of the
# MLPs and projections (a multiple of 64 would add 30% to a 197-token stack),
# while the kernel skips the key blocks past the real length anyway.
CUDNN_LENGTH_MULTIPLE = 2


def choose_attention_implementation(requested: str | None, platform: str, dtype) -> str:
  """The `implementation` of jax.nn.dot_product_attention to try for config.model.attention_impl.

  'auto' is 'cudnn' on a GPU with a 16-bit compute dtype (cuDNN's flash
  attention takes only float16/bfloat16), else 'xla'. `platform` is a device
  platform ('gpu', 'cpu', 'tpu').
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


def platform_being_traced_for() -> str:
  """The platform of the mesh the code is traced under (jax.set_mesh), else JAX's default."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
  """How one stack's attentions run: what `plan_attention` chose, for one shape."""
  implementation: str             # 'xla' | 'cudnn'
  batch: int
  num_tokens: int                 # the real tokens
  padded_tokens: int              # the tokens the blocks run on (>= num_tokens)
  num_heads: int
  head_dim: int
  dtype: str
  mask: str                       # 'none' | 'lengths' (key padding) | 'mask' (a boolean mask)
  fallback_reason: str | None = None  # why 'auto' could not use cuDNN

  @property
  def padded(self) -> bool:
    return self.padded_tokens != self.num_tokens

  def summary(self) -> str:
    """'cudnn 197->198', 'xla 50', 'xla 197 (fallback)': the kernel and tokens, briefly."""
    tokens = f'{self.num_tokens}->{self.padded_tokens}' if self.padded else f'{self.num_tokens}'
    return f'{self.implementation} {tokens}' + (' (fallback)' if self.fallback_reason else '')

  def describe(self) -> str:
    tokens = (f'{self.num_tokens} tokens padded to {self.padded_tokens}' if self.padded
              else f'{self.num_tokens} tokens')
    text = (f'attention over {tokens} (batch {self.batch}, {self.num_heads} heads of '
            f'{self.head_dim}, {self.dtype}, masking: {self.mask}): {self.implementation}')
    if self.fallback_reason:
      text += f", since cuDNN cannot run it ({self.fallback_reason}); set " \
              "model.attention_impl='xla' to choose XLA's explicitly"
    return text


def plan_attention(requested: str | None, *, platform: str, dtype, batch: int,
                   num_tokens: int, num_heads: int, head_dim: int,
                   mask_shape: tuple[int, ...] | None = None,
                   key_lengths: bool = False) -> AttentionPlan:
  """The implementation and padded length for a stack of attentions over these shapes.

  `mask_shape`: the shape of a boolean mask the stack is given, if any;
  `key_lengths`: whether it is given the real key lengths (key padding).
  'auto' on a GPU checks that cuDNN takes the padded shapes, forward and
  backward, and falls back to XLA (saying why) where it does not; an explicit
  'cudnn' is tried as asked and its errors propagate.
  """
  implementation = choose_attention_implementation(requested, platform, dtype)
  mask = 'mask' if mask_shape is not None else 'lengths' if key_lengths else 'none'
  plan = AttentionPlan(implementation, batch, num_tokens, num_tokens, num_heads, head_dim,
                       jnp.dtype(dtype).name, mask)
  if implementation != 'cudnn':
    return plan
  padded_tokens = -(-num_tokens // CUDNN_LENGTH_MULTIPLE) * CUDNN_LENGTH_MULTIPLE
  plan = dataclasses.replace(plan, padded_tokens=padded_tokens)
  if requested == 'auto':
    padded_mask_shape = (None if mask_shape is None
                         else (*mask_shape[:2], padded_tokens, padded_tokens))
    reason = _cudnn_unsupported_reason(
        batch, padded_tokens, num_heads, head_dim, plan.dtype, padded_mask_shape,
        key_lengths or plan.padded)
    if reason is not None:
      return dataclasses.replace(plan, implementation='xla', padded_tokens=num_tokens,
                                 fallback_reason=reason)
  return plan


@functools.cache  # a pure function of shapes; traced once per shape, not per stack and retrace
def _cudnn_unsupported_reason(batch, tokens, num_heads, head_dim, dtype, mask_shape,
                              with_lengths) -> str | None:
  """Why cuDNN attention cannot train on these shapes, or None if it can.

  Traces the forward and backward abstractly (nothing runs): JAX's cuDNN path
  checks its shapes while tracing, and with remat the backward's own check
  would otherwise fire in a later trace, outside any try around the call.
  """
  qkv = jax.ShapeDtypeStruct((batch, tokens, num_heads, head_dim), jnp.dtype(dtype))
  mask = None if mask_shape is None else jax.ShapeDtypeStruct(mask_shape, jnp.bool_)
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32) if with_lengths else None

  def forward_and_backward(q, k, v, mask, lengths):
    out, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=mask, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        implementation='cudnn'), q, k, v)
    return vjp(out)

  try:
    jax.eval_shape(forward_and_backward, qkv, qkv, qkv, mask, lengths)
  except (NotImplementedError, ValueError, RuntimeError) as error:
    return f'{type(error).__name__}: {error}'
  return None


@struct.dataclass
class TokenMasking:
  """Which tokens each block's attention may use; every field optional (None).

  mask: (B, 1|heads, T, T) bool, True = may attend. query_lengths and
  key_lengths: (B,) int32, the real tokens (padding trails them).
  """
  mask: jax.Array | None = None
  query_lengths: jax.Array | None = None
  key_lengths: jax.Array | None = None


def pad_tokens(plan: AttentionPlan, x: jax.Array, mask: jax.Array | None = None,
               key_lengths: jax.Array | None = None) -> tuple[jax.Array, TokenMasking]:
  """x (B, T, D) padded to plan.padded_tokens, and the masking its blocks attend with.

  Unpadded, the masking is what the caller gave. Padded, the real lengths say
  which tokens are real, and a mask gains rows and columns that attend nothing.
  """
  if not plan.padded:
    return x, TokenMasking(mask, None, key_lengths)
  extra = plan.padded_tokens - plan.num_tokens
  x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
  if mask is not None:
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, extra), (0, extra)), constant_values=False)
  real = jnp.full((x.shape[0],), plan.num_tokens, jnp.int32)
  return x, TokenMasking(mask, real, real if key_lengths is None else key_lengths)


def dot_product_attention(q, k, v, masking: TokenMasking, implementation: str) -> jax.Array:
  """Multi-head attention of (B, T, heads, head_dim) arrays under `masking`."""
  return jax.nn.dot_product_attention(
      q, k, v, mask=masking.mask, query_seq_lengths=masking.query_lengths,
      key_value_seq_lengths=masking.key_lengths, implementation=implementation)


# The plans already logged in the running stage (see choices_logged_per_stage).
_LOGGED_THIS_STAGE: contextvars.ContextVar[set | None] = contextvars.ContextVar(
    'attention_plans_logged_this_stage', default=None)


@contextlib.contextmanager
def choices_logged_per_stage():
  """Within this context (a training stage), each stack's plan is logged once.

  Yields the set of (stack, AttentionPlan) logged so far, filled as stacks trace.
  """
  logged = set()
  token = _LOGGED_THIS_STAGE.set(logged)
  try:
    yield logged
  finally:
    _LOGGED_THIS_STAGE.reset(token)


def log_plan(plan: AttentionPlan, stack: str) -> None:
  """Logs the plan of a stack (a module path), once per stage; every trace outside a stage."""
  logged = _LOGGED_THIS_STAGE.get()
  if logged is not None:
    if (stack, plan) in logged:
      return
    logged.add((stack, plan))
  log = logging.warning if plan.fallback_reason else logging.info
  log('%s: %s.', stack, plan.describe())
