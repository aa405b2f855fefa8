"""The analytic FLOPs model, the peak table and MFU (big_pretrain/train/mfu.py).

The analytic count is checked against XLA's own count of the compiled program
(`cost_analysis()['flops']`), which also counts elementwise ops (layer norms,
GELU, softmax): XLA's number is a little above the matmul-only count, never
below. Models are unrolled with no remat, so XLA sees each matmul once.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from big_pretrain.config.defaults import tiny_stage_config
from big_pretrain.data.batch_features import global_batch_shapes
from big_pretrain.models.masking import num_kept
from big_pretrain.models.vit import vit_from_config
from big_pretrain.objectives import build_objective, objective_names
from big_pretrain.compile_for import with_stand_ins
from big_pretrain.train import mfu
from big_pretrain.train import program_flops
from helpers.tiny_config import tiny_trainer


def small_config(objective, variant='mu/8', image_size=32, batch_size=4, **objective_keys):
  """`objective`'s tiny stage, unrolled and without remat, at `variant` and `image_size`."""
  return tiny_stage_config(objective, **{
      'model.variant': variant, 'model.scan': False, 'model.remat': 'none',
      'data.image_size': image_size, 'batch_size': batch_size,
      **{f'objective.{key}': value for key, value in objective_keys.items()}})


def xla_flops(fn, *args) -> float:
  return float(jax.jit(fn).lower(*args).compile().cost_analysis()['flops'])


def synthetic_batch(config):
  size, batch = config.data.image_size, config.batch_size
  return {'image': jnp.zeros((batch, size, size, 3), jnp.uint8),
          'label': jnp.zeros((batch,), jnp.int32),
          'label_ids': jnp.zeros((batch, 16), jnp.int32),
          'text_tokens': jnp.ones((batch, config.data.text.max_length), jnp.int32)}


# ---------------------------------------------------------------- against XLA


def test_vit_encoder_forward_matches_xla_within_10_percent():
  """Width 384, 17 tokens: matmuls are ~97% of XLA's count."""
  config = small_config('wsp', variant='S/16', image_size=64, batch_size=2)
  vit = vit_from_config(config.model)
  images = jnp.zeros((2, 64, 64, 3))
  params = jax.eval_shape(lambda: vit.init(jax.random.key(0), images[:1]))
  xla = xla_flops(lambda p, x: vit.apply(p, x)['tokens'], params, images)
  analytic = sum(mfu.vit_forward_flops(config, batch=2).values())
  assert mfu.encoder_num_tokens(config) == 16 + 1
  assert analytic <= xla <= 1.1 * analytic, (analytic, xla)


@pytest.mark.parametrize('objective, keys', [
    ('mae', {}), ('mae', {'encoder_on_all_tokens': True}), ('wsp', {}), ('flip', {}),
    ('aim', {})])
def test_objective_forward_matches_xla(objective, keys):
  """The whole training-mode loss (masking, heads, text tower, logits) of a width-64 model."""
  config = small_config(objective, **keys)
  obj = build_objective(config)
  params = nn.meta.unbox(jax.eval_shape(obj.init_params, jax.random.key(0)))
  xla = xla_flops(lambda p, b, r: obj.loss(p, b, r, True)[0],
                  params, synthetic_batch(config), jax.random.key(1))
  analytic = mfu.model_flops_breakdown(config).forward_total
  assert analytic <= xla <= 1.3 * analytic, (analytic, xla)


def test_train_step_is_three_forwards_and_matches_xla_gradient():
  config = small_config('wsp')
  breakdown = mfu.model_flops_breakdown(config)
  assert breakdown.train_step == 3 * breakdown.forward_total
  assert mfu.model_flops_per_step(config) == breakdown.train_step
  # XLA's forward + backward: within a few % of 3x (elementwise ops above,
  # the patch embedding's unneeded input gradient below).
  obj = build_objective(config)
  params = nn.meta.unbox(jax.eval_shape(obj.init_params, jax.random.key(0)))
  xla = xla_flops(jax.grad(lambda p, b, r: obj.loss(p, b, r, True)[0]),
                  params, synthetic_batch(config), jax.random.key(1))
  assert 0.95 * breakdown.train_step <= xla <= 1.3 * breakdown.train_step, (
      breakdown.train_step, xla)


# ---------------------------------------------------------------- the analytic model


def test_mae_encoder_counts_visible_tokens_only():
  """ViT-B/16 at 224: 196 patches, 49 kept at r = 0.75, plus cls."""
  def parts(**keys):
    return mfu.model_flops_breakdown(
        small_config('mae', variant='B/16', image_size=224, batch_size=8, **keys)).forward

  visible, all_tokens = parts(mask_ratio=0.75), parts(encoder_on_all_tokens=True)
  unmasked = parts(mask_ratio=0.0)
  assert num_kept(196, 0.75) == 49
  for linear in ('encoder/mlp', 'encoder/attention_projections'):
    np.testing.assert_allclose(visible[linear] / all_tokens[linear], (49 + 1) / (196 + 1))
  np.testing.assert_allclose(visible['encoder/attention_scores']
                             / all_tokens['encoder/attention_scores'], ((49 + 1) / (196 + 1)) ** 2)
  # Only the kept patches are embedded; the decoder always sees all of them.
  np.testing.assert_allclose(visible['encoder/patch_embed'] / all_tokens['encoder/patch_embed'],
                             49 / 196)
  for name in ('decoder/mlp', 'decoder/attention_scores', 'decoder/predict'):
    assert visible[name] == all_tokens[name]
  assert unmasked == all_tokens
  # (1 - r) scaling of the linear parts, across ratios.
  half = parts(mask_ratio=0.5)
  np.testing.assert_allclose(half['encoder/mlp'] / unmasked['encoder/mlp'], (98 + 1) / (196 + 1))


def test_vit_b16_forward_per_image_is_the_known_17_6_gflops():
  """ViT-B/16 at 224 (197 tokens) is ~17.6 GFLOPs per image forward (DeiT/timm's 17.6
  GMACs counted as 2 FLOPs each is 35.1 GFLOPs; 17.6 counts multiply-adds)."""
  config = small_config('wsp', variant='B/16', image_size=224, batch_size=1)
  forward = mfu.model_flops_breakdown(config, num_labels=1000).forward_total
  np.testing.assert_allclose(forward / 2, 17.6e9, rtol=0.01)


def test_flip_counts_text_tower_and_global_logits():
  config = small_config('flip', batch_size=16, mask_ratio=0.5)
  parts = mfu.model_flops_breakdown(config).forward
  assert parts['logits'] == 2 * 16 * 16 * 32
  assert mfu.encoder_num_tokens(config) == num_kept(16, 0.5)  # no cls in FLIP
  # text: T tokens, width D, 1 block: q,k,v,out + fc1,fc2 = 24 T D^2 per example.
  tokens, width = config.data.text.max_length, config.objective.text_width
  assert config.objective.text_depth == 1
  np.testing.assert_allclose(parts['text/attention_projections'] + parts['text/mlp'],
                             16 * 24 * tokens * width ** 2)


# ---------------------------------------------------------------- peaks and MFU


@pytest.mark.parametrize('device_kind, bf16_tflops, f32_tflops', [
    ('TPU v4', 275, 275),
    ('TPU v5 lite', 197, 197),
    ('TPU v5', 459, 459),
    ('TPU v5p', 459, 459),
    ('TPU v6 lite', 918, 918),
    ('TPU v3', 61.5, 61.5),
    ('NVIDIA H100 80GB HBM3', 989.5, 494.5),
    ('NVIDIA H100 PCIe', 756.5, 378),
    ('NVIDIA H200', 989.5, 494.5),
    ('NVIDIA A100-SXM4-80GB', 312, 156),
    ('NVIDIA A100-SXM4-40GB', 312, 156),
    ('NVIDIA L4', 121, 60),
    ('Tesla T4', 65, 8.1),
])
def test_known_peaks_by_device_kind(device_kind, bf16_tflops, f32_tflops):
  device = types.SimpleNamespace(device_kind=device_kind, platform='fake')
  np.testing.assert_allclose(mfu.peak_flops_per_device(device, 'bfloat16'), bf16_tflops * 1e12)
  np.testing.assert_allclose(mfu.peak_flops_per_device(device, jnp.bfloat16), bf16_tflops * 1e12)
  np.testing.assert_allclose(mfu.peak_flops_per_device(device, 'float32'), f32_tflops * 1e12)
  assert 'TFLOP/s' in mfu.describe_peak(device, 'bfloat16')


@pytest.mark.parametrize('device_kind', ['cpu', 'TPU v4 lite', 'NVIDIA GeForce RTX 4090', ''])
def test_unknown_devices_have_no_peak(device_kind):
  device = types.SimpleNamespace(device_kind=device_kind)
  assert mfu.peak_flops_per_device(device, 'bfloat16') is None
  assert mfu.peak_flops_per_device(jax.devices()[0], 'float32') is None  # this CPU


def test_measured_cpu_matmul_peak_is_positive():
  peak = mfu.measure_matmul_peak_flops('float32', size=256, repeats=3)
  assert np.isfinite(peak) and peak > 1e6


def test_mfu_arithmetic():
  # 2 devices of 100 TFLOP/s peak, 60 TFLOP in 0.5 s: 60 TFLOP/s each, 60%.
  assert mfu.achieved_flops_per_device(60e12, 0.5, 2) == 60e12
  np.testing.assert_allclose(mfu.mfu(60e12, 0.5, 2, 100e12), 0.6)
  with pytest.raises(ValueError):
    mfu.mfu(1e12, 0.0, 1, 1e12)
  with pytest.raises(ValueError):
    mfu.mfu(1e12, 1.0, 1, None)


# ---------------------------------------------------------------- the lowered program's count


@pytest.mark.parametrize('objective', objective_names())
@pytest.mark.integration
def test_the_lowered_programs_matmuls_count_every_layer_of_a_scanned_stack(objective, tmp_path):
  """XLA's cost_analysis counts a while loop's body once; program_flops multiplies it by the
  loop's trip count, so scanned and unrolled layers count the same, and both agree with the
  analytic count (which adds the patch embedding's unneeded input gradient: under 1%)."""
  counts = {}
  for scan in (False, True):
    config = small_config(objective, variant='S/16', image_size=64, batch_size=8)
    config.model.scan = scan
    config, _ = with_stand_ins(config, str(tmp_path))  # a student's pseudo-labels
    if 'mixup_alpha' in config.objective:  # Beta draws loop until accepted: no trip count
      config.objective.update(mixup_alpha=0.0, cutmix_alpha=0.0)
    _, trainer = tiny_trainer(config, jax.devices()[:1])
    lowered = trainer.lower_step(global_batch_shapes(config.data, config.batch_size))
    counts[scan] = program_flops.program_flops(lowered.as_text())
    assert counts[scan].exact
  assert counts[True].loops > counts[False].loops  # the scanned stacks' loops
  np.testing.assert_allclose(counts[True].flops, counts[False].flops, rtol=1e-9)
  analytic = mfu.model_flops_per_step(config)
  assert 0.99 * analytic <= counts[True].flops <= 1.001 * analytic, (counts[True], analytic)
