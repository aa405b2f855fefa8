"""Attention: the kernel chosen per platform and shape, padding that changes nothing, one log
line per stack and stage (big_pretrain/models/attention.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from big_pretrain.config.defaults import tiny_stage_config
from big_pretrain.data.batch_features import random_batch
from big_pretrain.models import attention as attention_lib
from big_pretrain.models.vit import VisionTransformer
from big_pretrain.objectives import build_objective, objective_names
from big_pretrain.compile_for import with_stand_ins
from helpers.numerics import assert_close_in_scale, assert_trees_close_in_scale
from helpers.tiny_config import tiny_mae_config

# ---------------------------------------------------------------- choosing


@pytest.mark.parametrize('requested, platform, dtype, expected', [
    ('auto', 'gpu', jnp.bfloat16, 'cudnn'),
    ('auto', 'gpu', jnp.float16, 'cudnn'),
    ('auto', 'gpu', jnp.float32, 'xla'),  # cuDNN's flash attention is 16-bit only
    ('auto', 'cpu', jnp.bfloat16, 'xla'),
    ('auto', 'cpu', jnp.float32, 'xla'),
    ('auto', 'tpu', jnp.bfloat16, 'xla'),
    ('auto', 'tpu', jnp.float32, 'xla'),
    ('xla', 'gpu', jnp.bfloat16, 'xla'),
    ('xla', 'cpu', jnp.float32, 'xla'),
    ('cudnn', 'gpu', jnp.bfloat16, 'cudnn'),
    ('cudnn', 'cpu', jnp.float32, 'cudnn'),  # explicit: tried as asked, its errors propagate
    (None, 'gpu', jnp.bfloat16, 'xla'),      # configs written before 'auto'
])
def test_choose_attention_implementation(requested, platform, dtype, expected):
  assert attention_lib.choose_attention_implementation(requested, platform, dtype) == expected


def test_unknown_attention_impl_raises():
  with pytest.raises(ValueError, match="'flash'"):
    attention_lib.choose_attention_implementation('flash', 'gpu', jnp.bfloat16)


def _plan(requested='auto', platform='gpu', num_tokens=197, **shapes):
  shapes = dict(dtype=jnp.bfloat16, batch=256, num_heads=16, head_dim=32) | shapes
  return attention_lib.plan_attention(requested, platform=platform, num_tokens=num_tokens,
                                      **shapes)


def test_cudnn_plans_pad_odd_lengths_to_even_and_leave_even_ones(monkeypatch):
  # As on a GPU whose cuDNN takes the shapes (this CPU has no cuDNN to ask).
  monkeypatch.setattr(attention_lib, '_cudnn_unsupported_reason', lambda *args: None)
  odd = _plan(num_tokens=197)
  assert (odd.implementation, odd.num_tokens, odd.padded_tokens) == ('cudnn', 197, 198)
  assert odd.padded
  even = _plan(num_tokens=50)  # MAE's encoder: cls + 49 visible patches
  assert (even.implementation, even.padded_tokens, even.padded) == ('cudnn', 50, False)
  masked = _plan(num_tokens=197, mask_shape=(256, 1, 197, 197))
  assert masked.padded_tokens == 198 and masked.mask == 'mask'
  # XLA runs any length as it is.
  for plan in (_plan(platform='cpu'), _plan(requested='xla'), _plan(dtype=jnp.float32)):
    assert (plan.implementation, plan.padded_tokens) == ('xla', 197)


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='needs a platform without cuDNN')
def test_auto_falls_back_to_xla_with_the_reason_where_cudnn_cannot_run():
  plan = _plan()
  assert plan.implementation == 'xla' and not plan.padded
  assert 'cuDNN' in plan.fallback_reason
  assert 'cuDNN cannot run it' in plan.describe()


def test_padded_shapes_pass_the_checks_jax_runs_before_cudnn_attention():
  # JAX's own shape checks for cuDNN attention (private API of the pinned jax).
  # Training passes a placeholder bias, so has_bias is True even without one:
  # odd lengths are refused, the padded lengths are not.
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_checks
  layout = cudnn_checks.AttentionLayout.BTNH
  batch = 8

  def check(tokens, bias_shape=None):
    qkv = jax.ShapeDtypeStruct((batch, tokens, 12, 64), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    bias = None if bias_shape is None else jax.ShapeDtypeStruct(bias_shape, jnp.bfloat16)
    cudnn_checks.check_layout(qkv, qkv, qkv, bias, lengths, lengths, None, None, None, None,
                              layout)
    cudnn_checks.check_is_flash_attention(qkv, qkv, qkv, layout.value, cudnn_version=91000,
                                          has_bias=True, is_training=True)

  with pytest.raises(NotImplementedError, match='Unsupported sequence length Q 197'):
    check(197)
  with pytest.raises(ValueError, match='Bias must have same seq length'):
    check(32, bias_shape=(batch, 1, 1, 32))  # a key-padding mask: lengths are used instead
  padded = lambda tokens: attention_lib.plan_attention(
      'cudnn', platform='gpu', dtype=jnp.bfloat16, batch=batch, num_tokens=tokens,
      num_heads=12, head_dim=64).padded_tokens
  # ViT/16 at 224 with cls (MAE decoder, WSP, probes), FLIP's image tower at
  # r = 0.5 with cls, H/14 with cls, MAE's encoder, FLIP's text.
  for tokens in (197, 99, 257, 50, 32):
    check(padded(tokens))
  check(196, bias_shape=(batch, 1, 196, 196))  # AIM's prefix-causal mask, B/16 at 224
  check(padded(17), bias_shape=(batch, 1, padded(17), padded(17)))


# ---------------------------------------------------------------- padding changes nothing


def _tiny_stage(objective, folder):
  """The objective's tiny stage, pseudo-labels standing in for a student's."""
  return with_stand_ins(tiny_stage_config(objective), str(folder))[0]


def _loss_grads_and_features(objective, params, batch):
  """Loss, gradients and (AIM, whose probe reads the blocks' outputs) the probe
  features, each from a fresh jit (so it traces again)."""
  loss_and_grads = jax.jit(lambda p, b, rng: jax.value_and_grad(
      objective.loss, has_aux=True)(p, b, rng, True))(params, batch, jax.random.key(1))
  if objective.name != 'aim':
    return loss_and_grads
  features = jax.jit(lambda p, images: objective.encode(p, images, num_last_blocks=1))(
      params, batch['image'])
  return loss_and_grads, features


@pytest.mark.parametrize('objective_name', objective_names())
@pytest.mark.integration
def test_padded_attention_gives_the_same_loss_gradients_and_features(objective_name,
                                                                     monkeypatch, tmp_path):
  config = _tiny_stage(objective_name, tmp_path)
  objective = build_objective(config)
  params = nn.meta.unbox(jax.jit(objective.init_params)(jax.random.key(0)))
  batch = random_batch(config.data, 4, np.random.default_rng(0))
  unpadded = _loss_grads_and_features(objective, params, batch)

  # The padded path, run by XLA's attention with the same real lengths: every
  # stack pads to the next multiple of 8 past its length (at least one token).
  plans, plan_attention = [], attention_lib.plan_attention

  def padded_xla_plan(requested, **shapes):
    plan = plan_attention('xla', **shapes)
    plan = dataclasses.replace(plan, padded_tokens=(plan.num_tokens + 8) // 8 * 8)
    plans.append(plan)
    return plan

  monkeypatch.setattr(attention_lib, 'plan_attention', padded_xla_plan)
  padded = _loss_grads_and_features(objective, params, batch)
  assert plans and all(plan.padded for plan in plans)
  masks = {plan.mask for plan in plans}
  # AIM: training's prefix-causal mask, the probe's none; a text tower: its padding's lengths.
  assert masks == ({'none'} | ({'mask'} if objective_name == 'aim' else set())
                   | ({'lengths'} if config.data.text.tokenizer else set()))
  # Padding changes the softmax's and the gradients' reduction lengths, so their order.
  assert_trees_close_in_scale(padded, unpadded)


def test_text_padding_as_key_lengths_equals_masking_the_padded_keys():
  # FLIP's text tower gives its trailing padding as lengths; XLA's attention
  # with the equivalent (B, 1, 1, T) boolean mask must agree.
  tokens = jnp.array([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]], jnp.int32)
  x = jax.random.normal(jax.random.key(0), (2, 6, 4, 8))
  lengths = jnp.array([4, 3], jnp.int32)
  by_lengths = attention_lib.dot_product_attention(
      x, x, x, attention_lib.TokenMasking(key_lengths=lengths), 'xla')
  by_mask = attention_lib.dot_product_attention(
      x, x, x, attention_lib.TokenMasking(mask=(tokens != 0)[:, None, None, :]), 'xla')
  assert_close_in_scale(by_lengths, by_mask)


# ---------------------------------------------------------------- what is used, and saying so


def _trace_mae_loss(objective, params, batch):
  jax.jit(lambda p, b, rng: objective.loss(p, b, rng)[0]).lower(params, batch, jax.random.key(0))


def test_each_stack_logs_its_plan_once_per_stage(caplog):
  config = tiny_mae_config()
  objective = build_objective(config)
  params = nn.meta.unbox(jax.eval_shape(objective.init_params, jax.random.key(0)))
  batch = random_batch(config.data, 4, np.random.default_rng(0))
  caplog.set_level('INFO')

  def logged():
    return [r.getMessage() for r in caplog.records if 'attention over' in r.getMessage()]

  with attention_lib.choices_logged_per_stage():
    for _ in range(3):  # traced three times in one stage
      _trace_mae_loss(objective, params, batch)
  first_stage = logged()
  assert len(first_stage) == 2, first_stage
  assert first_stage[0].startswith('encoder/transformer: attention over 5 tokens (batch 4')
  assert first_stage[1].startswith('decoder/transformer: attention over 17 tokens (batch 4')
  assert all(line.endswith(': xla.') for line in first_stage)
  with attention_lib.choices_logged_per_stage():  # the next stage says it again
    _trace_mae_loss(objective, params, batch)
  assert logged() == first_stage * 2


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='needs a platform without cuDNN')
def test_auto_on_a_platform_without_cudnn_runs_xla_and_warns_once_per_stack(monkeypatch,
                                                                           caplog):
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

  def forward(attention_impl):
    vit = VisionTransformer(width=64, depth=2, num_heads=4, patch_size=8, dtype=jnp.bfloat16,
                            attention_impl=attention_impl)
    params = jax.jit(vit.init)(jax.random.key(0), images)
    return jax.jit(vit.apply)(params, images)

  xla = forward('xla')
  # Pretend to be a GPU, so 'auto' asks for cuDNN in bfloat16; JAX finds no cuDNN here.
  monkeypatch.setattr(attention_lib, 'platform_being_traced_for', lambda: 'gpu')
  caplog.set_level('WARNING')
  auto = forward('auto')
  np.testing.assert_array_equal(np.asarray(auto['tokens'], np.float32),
                                np.asarray(xla['tokens'], np.float32))
  fallbacks = [r for r in caplog.records if 'cuDNN cannot run it' in r.getMessage()]
  assert len(fallbacks) == 2, 'once per trace of the stack (init, apply), not once per layer'


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='needs a platform without cuDNN')
def test_explicit_cudnn_errors_where_it_cannot_run():
  images = jnp.zeros((2, 32, 32, 3))
  vit = VisionTransformer(width=64, depth=2, num_heads=4, patch_size=8, dtype=jnp.bfloat16,
                          attention_impl='cudnn')
  with pytest.raises(RuntimeError, match='cuDNN'):  # while tracing: no compile needed
    jax.eval_shape(vit.init, jax.random.key(0), images)
