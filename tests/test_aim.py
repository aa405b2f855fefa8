"""The AIM facts of docs/methods.md, section 5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from big_pretrain.config.defaults import stage_config, tiny_stage_config
from big_pretrain.models.vit import VisionTransformer
from big_pretrain.objectives import build_objective
from big_pretrain.objectives.aim import (next_patch_loss, prefix_causal_mask,
                                         sample_prefix_lengths, target_weights)


def test_mask_shape_and_formula():
  prefix_lengths = jnp.array([1, 3, 5])
  mask = np.asarray(prefix_causal_mask(prefix_lengths, 6))
  assert mask.shape == (3, 1, 6, 6) and mask.dtype == bool
  for b, prefix in enumerate([1, 3, 5]):
    for i in range(6):
      for j in range(6):
        assert mask[b, 0, i, j] == (j < prefix or j <= i), (b, i, j)


def test_prefix_lengths_are_uniform_over_1_to_l_minus_1():
  lengths = np.asarray(sample_prefix_lengths(jax.random.key(0), 20_000, 16))
  assert lengths.min() == 1 and lengths.max() == 15
  counts = np.bincount(lengths, minlength=16)[1:]
  assert np.all(np.abs(counts / 20_000 - 1 / 15) < 0.01)


def test_exactly_l_minus_p_targets_per_example():
  prefix_lengths = jnp.array([1, 4, 15])
  weights = np.asarray(target_weights(prefix_lengths, 16))
  np.testing.assert_array_equal(weights.sum(axis=1), [15, 12, 1])
  # The targets are the last L - P patches: indices P..L-1 (weights index patch t = 1..L-1).
  np.testing.assert_array_equal(np.flatnonzero(weights[1]) + 1, np.arange(4, 16))


def test_no_leakage_perturbing_patch_k_at_or_after_p_leaves_earlier_outputs_unchanged():
  vit = VisionTransformer(width=32, depth=2, num_heads=4, patch_size=8, use_cls_token=False,
                          pool='gap')
  images = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
  params = vit.init(jax.random.key(1), images)['params']
  prefix, k = 5, 9
  mask = prefix_causal_mask(jnp.array([prefix]), 16)
  perturbed = images.at[:, 16:24, 8:16].add(3.0)  # patch (row 2, col 1) = raster index 9
  out = vit.apply({'params': params}, images, attention_mask=mask)['patch_tokens']
  out_perturbed = vit.apply({'params': params}, perturbed, attention_mask=mask)['patch_tokens']
  np.testing.assert_array_equal(out[:, :k], out_perturbed[:, :k])
  assert not np.allclose(out[:, k:], out_perturbed[:, k:])
  # Without the mask (evaluation: bidirectional) every position sees the change.
  full = vit.apply({'params': params}, images)['patch_tokens']
  full_perturbed = vit.apply({'params': params}, perturbed)['patch_tokens']
  assert not np.allclose(full[:, 0], full_perturbed[:, 0])


def test_perfect_prediction_gives_zero_and_prefix_targets_get_no_gradient():
  target = jax.random.normal(jax.random.key(0), (2, 16, 12))
  prefix_lengths = jnp.array([3, 10])
  perfect = jnp.concatenate([target[:, 1:], jnp.zeros((2, 1, 12))], axis=1)  # i predicts i+1
  assert float(next_patch_loss(perfect, target, prefix_lengths)) == 0.0
  pred = jax.random.normal(jax.random.key(1), (2, 16, 12))
  grad = np.asarray(jax.grad(next_patch_loss)(pred, target, prefix_lengths))
  # Position i predicts patch i+1: positions < P-1 predict prefix patches, the last predicts nothing.
  assert np.all(grad[0, :2] == 0) and np.all(grad[0, 2:15] != 0) and np.all(grad[0, 15] == 0)
  assert np.all(grad[1, :9] == 0) and np.all(grad[1, 9:15] != 0)


@pytest.mark.integration
def test_aim_objective_end_to_end():
  config = tiny_stage_config('aim', **{'objective.head_depth': 2})
  objective = build_objective(config)
  params = nn.meta.unbox(objective.init_params(jax.random.key(0)))
  assert 'cls_token' not in params['encoder'] and set(params) == {'encoder', 'head'}
  batch = {'image': jax.random.randint(jax.random.key(1), (4, 32, 32, 3), 0, 256).astype(jnp.uint8)}
  # One compiled program (op-by-op, the ViT's forward and backward take ~10x longer).
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      lambda p: objective.loss(p, batch, jax.random.key(2)), has_aux=True))(params)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  assert 1 <= float(metrics['mean_prefix_length']) <= 15


def test_aim_with_a_cls_token_is_refused():
  from big_pretrain.config.validation import validate_stage_config
  from big_pretrain.errors import ConfigError
  config = stage_config('aim')
  with pytest.raises(ConfigError, match=r'use_cls_token must be False'):
    validate_stage_config(config)
