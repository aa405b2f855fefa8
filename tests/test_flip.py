"""The contrastive facts of docs/methods.md, section 4."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from big_pretrain import sharding as sharding_lib
from big_pretrain.objectives.flip import contrastive_loss, l2_normalize, logit_scale_from
from helpers.numerics import assert_trees_close_in_scale
from helpers.tiny_config import tiny_flip_config, tiny_trainer


def _raw_embeddings(n=16, dim=8, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (n, dim)), jax.random.normal(k2, (n, dim))


def _loss_from_raw(raw_images, raw_texts, theta):
  return contrastive_loss(l2_normalize(raw_images), l2_normalize(raw_texts),
                          logit_scale_from(theta))[0]


def test_loss_and_gradients_on_8_devices_equal_one_device_on_the_concatenated_batch():
  raw_images, raw_texts = _raw_embeddings()
  theta = jnp.float32(math.log(1 / 0.07))
  grad_fn = jax.value_and_grad(_loss_from_raw, argnums=(0, 1, 2))
  single_loss, single_grads = jax.jit(grad_fn)(raw_images, raw_texts, theta)

  config = {'data': 2, 'fsdp': 4, 'tensor': 1}
  mesh = sharding_lib.make_mesh(config)
  batch = NamedSharding(mesh, PartitionSpec(sharding_lib.BATCH_AXES))
  sharded_images = jax.device_put(raw_images, batch)
  sharded_texts = jax.device_put(raw_texts, batch)
  assert len(sharded_images.addressable_shards) == 8
  assert sharded_images.addressable_shards[0].data.shape == (2, 8)  # each device: 2 examples
  with sharding_lib.activate(mesh, sharding_lib.DEFAULT_LOGICAL_AXIS_RULES):
    sharded_loss, sharded_grads = jax.jit(grad_fn)(sharded_images, sharded_texts, theta)
  np.testing.assert_allclose(sharded_loss, single_loss, rtol=1e-6)
  assert_trees_close_in_scale(sharded_grads, single_grads)
  # Every example's gradient depends on the others: a per-device (local) loss would differ.
  local = sum(_loss_from_raw(raw_images[i:i + 2], raw_texts[i:i + 2], theta) for i in range(0, 16, 2)) / 8
  assert abs(float(local) - float(single_loss)) > 0.1


def test_permuting_the_batch_leaves_the_loss_unchanged():
  raw_images, raw_texts = _raw_embeddings()
  permutation = np.random.default_rng(0).permutation(16)
  theta = jnp.float32(2.0)
  np.testing.assert_allclose(
      _loss_from_raw(raw_images[permutation], raw_texts[permutation], theta),
      _loss_from_raw(raw_images, raw_texts, theta), rtol=1e-6)


@pytest.mark.parametrize('n, scale', [(4, 1.0), (8, 1 / 0.07), (16, 100.0)])
def test_orthonormal_embeddings_give_log_1_plus_n_minus_1_exp_minus_s(n, scale):
  embeddings = jnp.eye(n, 16)
  loss, accuracy = contrastive_loss(embeddings, embeddings, jnp.float32(scale))
  # log-softmax subtracts numbers of size `scale`: float32 leaves ~1 ulp of it (1e-6 at 14).
  np.testing.assert_allclose(loss, math.log(1 + (n - 1) * math.exp(-scale)),
                             rtol=1e-5, atol=2e-7 * scale)
  assert accuracy == 1.0


def test_scale_starts_at_1_over_007_and_is_capped_at_100():
  np.testing.assert_allclose(logit_scale_from(jnp.float32(math.log(1 / 0.07))), 1 / 0.07, rtol=1e-6)
  np.testing.assert_allclose(logit_scale_from(jnp.float32(10.0)), 100.0, rtol=1e-6)
  assert float(jax.grad(logit_scale_from)(jnp.float32(10.0))) == 0.0  # capped: no push beyond
  assert float(logit_scale_from(jnp.float32(-3.0))) == 1.0


def test_loss_stays_finite_when_scaled_cosine_is_100():
  same = l2_normalize(jnp.ones((8, 4)))  # every pair has cosine 1
  loss, _ = contrastive_loss(same, same, jnp.float32(100.0))
  grads = jax.grad(lambda z: contrastive_loss(z, same, jnp.float32(100.0))[0])(same)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(grads))
  # All logits equal (~100): the result is log(8) up to float32 rounding at 100.
  np.testing.assert_allclose(loss, math.log(8), atol=2e-5)


@pytest.mark.integration
def test_patches_are_dropped_in_training_only():
  from flax import linen as nn
  from big_pretrain.data.train_input import InputPipeline
  from big_pretrain.objectives import build_objective
  config = tiny_flip_config()
  objective = build_objective(config)
  params = nn.meta.unbox(jax.jit(objective.init_params)(jax.random.key(0)))
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  batch = next(InputPipeline(config.data, global_batch_size=16, mesh=mesh))
  images = jnp.zeros((16, 32, 32, 3))
  assert objective._keep_indices(jax.random.key(1), images, train=True).shape == (16, 8)  # 16 * 0.5
  assert objective._keep_indices(jax.random.key(1), images, train=False) is None
  # Compiled once per mode (op by op, the two towers take several times as long).
  compiled = {train: jax.jit(lambda rng, train=train: objective.loss(params, batch, rng, train)[0])
              for train in (True, False)}
  loss = lambda rng, train: float(compiled[train](jax.random.key(rng)))
  assert loss(1, True) != loss(2, True)    # which patches are dropped depends on the rng
  assert loss(1, False) == loss(2, False)  # at evaluation every patch is seen
  # Evaluation embeddings use all 16 patches.
  assert jax.jit(objective.embed_images)(params, batch['image']).shape == (16, 32)


@pytest.mark.integration
def test_flip_loss_and_gradients_on_8_devices_equal_one_device():
  """The whole objective (towers, masking, global InfoNCE) under data + FSDP sharding."""
  from big_pretrain.data.train_input import InputPipeline
  config = tiny_flip_config()
  results = {}
  for name, mesh_shape, devices in (('sharded', (2, 4, 1), jax.devices()),
                                    ('single', (1, 1, 1), jax.devices()[:1])):
    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    objective, trainer = tiny_trainer(config, devices)
    mesh, rules = trainer.mesh, trainer.rules
    params = trainer.init_state(jax.random.key(0)).params
    batch = next(InputPipeline(config.data, global_batch_size=16, mesh=mesh))
    grad_fn = jax.jit(jax.value_and_grad(objective.loss, has_aux=True), static_argnums=3)
    with sharding_lib.activate(mesh, rules):
      (loss, _), grads = grad_fn(params, batch, jax.random.key(3), True)
    results[name] = (float(loss), jax.device_get(grads))
  assert results['sharded'][0] == pytest.approx(results['single'][0], rel=1e-6)
  # Reduction order differs across devices.
  assert_trees_close_in_scale(results['sharded'][1], results['single'][1])
