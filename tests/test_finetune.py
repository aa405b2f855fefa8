"""Fine-tuning (MAE's protocol): layer-wise lr decay, frozen parameters, mixup / cutmix,
drop path, and a stage that starts from an MAE checkpoint and resumes bit-identically."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from big_pretrain import sharding as sharding_lib
from big_pretrain.data.batch_features import random_batch
from big_pretrain.errors import ConfigError
from big_pretrain.objectives import build_objective
from big_pretrain.objectives.finetune import (cutmix_box, mixup_or_cutmix, multi_hot_targets,
                                              smoothed_one_hot)
from big_pretrain.stages import chain
from big_pretrain.stages import init_from as init_from_lib
from big_pretrain.stages.chain_validation import validate_config
from big_pretrain.train import optim
from big_pretrain.train.loop import train_stage
from big_pretrain.train.optim import OPTIM_KEYS
from helpers.tiny_config import (one_device, one_device_trainer, tiny_finetune_config,
                                 tiny_mae_config)
from helpers.trees import assert_trees_equal, named_leaves


# ---------------------------------------------------------------- layer-wise lr decay


@pytest.mark.parametrize('scan', [False, True])
def test_layer_decay_gives_each_parameter_lr_times_decay_to_the_depth_below_the_top(scan):
  config = tiny_finetune_config(**{'model.scan': scan})
  params = nn.meta.unbox(jax.eval_shape(build_objective(config).init_params, jax.random.key(0)))
  params = jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, p.dtype), params)
  optim_config = OPTIM_KEYS.defaults()
  optim_config.update(weight_decay=0.0, b1=0.0, b2=0.0, eps=0.0, layer_decay=0.5)
  lr, decay, depth = 0.1, 0.5, 2  # 'mu' has 2 blocks: L = 3
  tx = optim.make_optimizer(optim_config, optax.constant_schedule(lr))
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  # b1 = b2 = eps = 0: Adam's step is exactly sign(g) = 1, so the update is -lr * scale.
  updates, _ = tx.update(grads, tx.init(params), params)
  expected_layer = {
      'encoder/patch_embed/kernel': 0, 'encoder/cls_token': 0,
      'encoder/transformer/block_0/mlp/fc1/kernel': 1,
      'encoder/transformer/block_1/attention/query/kernel': 2,
      'encoder/transformer/norm/scale': 3, 'fc_norm/bias': 3, 'head/kernel': 3}
  flat = {optim.param_path(path): np.asarray(u)
          for path, u in jax.tree_util.tree_leaves_with_path(updates)}
  if scan:
    for name, layer in list(expected_layer.items()):
      if '/block_' in name:
        del expected_layer[name]
    stacked = flat['encoder/transformer/blocks/mlp/fc1/kernel']
    for row in range(depth):  # block i is layer i + 1
      np.testing.assert_allclose(stacked[row], -lr * decay ** (depth + 1 - (row + 1)),
                                 rtol=1e-6)
  for name, layer in expected_layer.items():
    np.testing.assert_allclose(flat[name], -lr * decay ** (depth + 1 - layer), rtol=1e-6,
                               err_msg=name)
  assert optim.tree_encoder_depth(params) == depth


def test_fine_tuning_excludes_tokens_from_weight_decay():
  params = {'encoder': {'cls_token': jnp.ones((1, 1, 4)), 'pos_embedding': jnp.ones((1, 4, 4)),
                        'patch_embed': {'kernel': jnp.ones((2, 2, 3, 4))}}}
  mask = optim.weight_decay_mask(params, exclude=('cls_token', 'pos_embedding'))
  assert mask == {'encoder': {'cls_token': False, 'pos_embedding': False,
                              'patch_embed': {'kernel': True}}}


# ---------------------------------------------------------------- frozen parameters


@pytest.mark.parametrize('trainable, trained', [
    ('head', ('head/', 'fc_norm/')),
    ('last_block_mlp', ('head/', 'fc_norm/', 'encoder/transformer/norm/',
                        'encoder/transformer/block_1/mlp/')),
    ('last_k_blocks', ('head/', 'fc_norm/', 'encoder/transformer/norm/',
                       'encoder/transformer/block_1/')),
    ('all', ('',)),
])
def test_each_trainable_choice_trains_exactly_its_parameters(trainable, trained):
  config = tiny_finetune_config(**{'objective.trainable': trainable,
                                   'objective.trainable_blocks': 1})
  objective = build_objective(config)
  params = nn.meta.unbox(jax.eval_shape(objective.init_params, jax.random.key(0)))
  for name in named_leaves(params):
    assert objective.is_trainable(name) == name.startswith(trained), name


@pytest.mark.parametrize('trainable, trained', [
    ('last_k_blocks', ('head/', 'fc_norm/', 'encoder/transformer/norm/',
                       'encoder/transformer/block_1/')),
])
@pytest.mark.integration
def test_frozen_parameters_do_not_change_and_hold_no_optimizer_moments(trainable, trained):
  config = tiny_finetune_config(**{'objective.trainable': trainable,
                                   'optim.ema_decay': 0.9, 'optim.layer_decay': 0.75})
  trainer = one_device_trainer(config)
  state = trainer.init_state(jax.random.key(0))
  before = jax.device_get(state.params)
  batch = jax.device_put(random_batch(config.data, config.batch_size, np.random.default_rng(0)),
                         sharding_lib.batch_sharding(trainer.mesh))
  for _ in range(3):  # step 1 has lr 0 (warm-up); step 2 moves the zero head; step 3 the rest
    state, metrics = trainer.train_step(state, batch, jax.random.key(1))
  after = jax.device_get(state.params)
  assert np.isfinite(float(metrics['loss']))
  changed, unchanged = [], []
  for path, old in jax.tree_util.tree_leaves_with_path(before):
    name = optim.param_path(path)
    new = after
    for key in name.split('/'):
      new = new[key]
    (changed if not np.array_equal(old, new) else unchanged).append(name)
  is_trained = lambda name: name.startswith(trained)
  # Everything trained moves; everything frozen is bit-identical.
  assert changed and all(is_trained(name) for name in changed)
  assert all(not is_trained(name) for name in unchanged), unchanged
  # Adam's moments (and the EMA) exist for the trained leaves only.
  adam = optim.find_state(state.opt_state, optax.ScaleByAdamState)
  moments = [optim.param_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(adam.mu)]
  assert moments and all(is_trained(name) for name in moments)
  assert len(moments) == len([n for n in named_leaves(before) if is_trained(n)])
  ema = optim.ema_params(state.opt_state, state.params)
  for (name, frozen), ema_leaf in zip(named_leaves(before).items(),
                                     jax.tree_util.tree_leaves(ema)):
    if not is_trained(name):
      np.testing.assert_array_equal(ema_leaf, frozen)


@pytest.mark.integration
def test_frozen_encoder_is_not_differentiated():
  # stop_gradient on frozen parameters lets XLA drop their backward: far fewer FLOPs.
  shapes = {'image': jax.ShapeDtypeStruct((16, 32, 32, 3), np.uint8),
            'label': jax.ShapeDtypeStruct((16,), np.int32)}
  flops = {}
  for trainable in ('all', 'head'):
    compiled = one_device_trainer(
        tiny_finetune_config(**{'objective.trainable': trainable})).compile_step(shapes)
    flops[trainable] = compiled.cost_analysis()['flops']
  assert flops['head'] < 0.6 * flops['all'], flops


def test_partial_fine_tuning_of_a_scanned_encoder_is_refused_with_the_fix():
  config = tiny_finetune_config(**{'objective.trainable': 'last_k_blocks', 'model.scan': True})
  with pytest.raises(ConfigError, match='model.scan=False'):
    validate_config(config)


# ---------------------------------------------------------------- mixup, cutmix, targets


def _mix(seed, **kwargs):
  images = jax.random.uniform(jax.random.key(5), (8, 16, 16, 3))
  targets = smoothed_one_hot(jnp.arange(8) % 5, 5, 0.1)
  kwargs = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5) | kwargs
  return images, targets, mixup_or_cutmix(jax.random.key(seed), images, targets, **kwargs)


def test_mixup_and_cutmix_keep_label_mass_one_and_are_deterministic_given_the_rng():
  kinds = set()
  for seed in range(12):
    images, targets, (mixed, mixed_targets, lam, cutmix) = _mix(seed)
    np.testing.assert_allclose(mixed_targets.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * targets[::-1],
                               rtol=1e-6)
    assert 0.0 <= float(lam) <= 1.0
    kinds.add(bool(cutmix))
    if cutmix:  # each pixel is the image's own or its partner's; lam = the kept fraction
      own = np.isclose(mixed, images).all(axis=-1)
      partner = np.isclose(mixed, images[::-1]).all(axis=-1)
      assert (own | partner).all()
      np.testing.assert_allclose(own[0].mean(), float(lam), atol=1e-6)
    again = _mix(seed)[2]
    for a, b in zip((mixed, mixed_targets, lam, cutmix), again):
      np.testing.assert_array_equal(a, b)
  assert kinds == {True, False}, 'both mixup and cutmix batches occur'


def test_mixup_and_cutmix_switched_off_leave_the_batch_alone():
  images, targets, (mixed, mixed_targets, lam, _) = _mix(0, mixup_alpha=0.0, cutmix_alpha=0.0)
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_array_equal(mixed_targets, targets)
  assert float(lam) == 1.0


def test_cutmix_box_area_matches_lambda():
  mask, lam = cutmix_box(jax.random.key(3), 32, 32, jnp.float32(0.75))
  np.testing.assert_allclose(1.0 - np.asarray(mask).mean(), float(lam), atol=1e-6)
  assert 0 < np.asarray(mask).sum() <= 32 * 32 * 0.25 + 1e-6  # side sqrt(0.25) * 32 = 16, clipped


def test_smoothed_and_multi_hot_targets():
  np.testing.assert_allclose(smoothed_one_hot(jnp.array([2]), 4, 0.1),
                             [[0.025, 0.025, 0.925, 0.025]], rtol=1e-6)
  rows = multi_hot_targets(jnp.array([[0, 3, -1], [-1, -1, -1]]), 4, 0.0)
  np.testing.assert_allclose(rows, [[0.5, 0, 0, 0.5], [0.25] * 4], rtol=1e-6)


# ---------------------------------------------------------------- drop path


def test_drop_path_is_random_in_training_and_off_at_evaluation():
  config = tiny_finetune_config(**{'model.drop_path': 0.5})
  objective = build_objective(config)
  params = nn.meta.unbox(jax.jit(objective.init_params)(jax.random.key(0)))
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  # The encoder's tokens (the zero-initialized head would hide any difference).
  apply = jax.jit(lambda p, x, train, rng: objective.model.encoder.apply(
      {'params': p['encoder']}, x, train=train, rngs={'dropout': rng})['tokens'],
                  static_argnums=2)
  eval_a = apply(params, images, False, jax.random.key(2))
  eval_b = apply(params, images, False, jax.random.key(3))
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = apply(params, images, True, jax.random.key(2))
  train_b = apply(params, images, True, jax.random.key(3))
  assert not np.allclose(train_a, train_b)
  np.testing.assert_array_equal(train_a, apply(params, images, True, jax.random.key(2)))


# ---------------------------------------------------------------- a stage from MAE


@pytest.fixture(scope='module')
def mae_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('mae')
  train_stage(tiny_mae_config(total_steps=2), str(workdir), devices=one_device())
  return str(workdir)


@pytest.mark.integration
def test_a_stage_from_mae_takes_the_encoder_bit_exactly_and_resumes_bit_identically(
    mae_workdir, tmp_path):
  config = tiny_finetune_config(**{'init_from.checkpoint': mae_workdir,
                                   'optim.layer_decay': 0.75, 'model.drop_path': 0.1})
  config.evals.classification = dict(kind='classification', test_examples=24, batch_size=8)
  validate_config(config)

  # The encoder is MAE's, bit for bit; the decoder and mask token are not taken.
  initialize = chain.initializer_from(config.init_from, str(tmp_path))
  fresh = one_device_trainer(config).init_state(jax.random.key(0)).params
  started = jax.device_get(initialize(fresh))
  assert set(started) == {'encoder', 'fc_norm', 'head'}
  mae_encoder = init_from_lib.read_subtrees(init_from_lib.resolve_checkpoint_dir(mae_workdir),
                                       ('encoder',))['encoder']
  assert_trees_equal(started['encoder'], mae_encoder)

  whole = train_stage(config, str(tmp_path / 'whole'), initialize=initialize, devices=one_device())
  first = train_stage(config, str(tmp_path / 'split'), initialize=initialize, stop_after_steps=2,
                      devices=one_device())
  assert first.steps_run == 2 and not first.finished
  resumed = train_stage(config, str(tmp_path / 'split'), initialize=initialize,
                        devices=one_device())
  assert resumed.finished and resumed.steps_run == 2
  assert_trees_equal(jax.device_get(resumed.state.params), jax.device_get(whole.state.params))
  assert_trees_equal(jax.device_get(resumed.state.opt_state), jax.device_get(whole.state.opt_state))
  scores = whole.eval_results['classification']
  assert scores['examples'] == 24 and 0.0 <= scores['top1'] <= scores['top5'] <= 1.0
  assert os.path.exists(tmp_path / 'whole' / 'eval_results.json')
  # The class count was read off the data once, and recorded with the run.
  recorded = json.loads((tmp_path / 'whole' / 'config.json').read_text())
  assert recorded['objective']['num_classes'] == 10 and config.objective.num_classes is None


def test_parameter_ema_follows_the_new_parameters():
  params = {'w': jnp.array([1.0, 2.0])}
  tx = optim.track_params_ema(0.9)
  state = tx.init(params)
  updates = {'w': jnp.array([0.5, -1.0])}
  passed, state = tx.update(updates, state, params)
  np.testing.assert_array_equal(passed['w'], updates['w'])  # the update itself is untouched
  np.testing.assert_allclose(state.ema['w'], 0.9 * params['w'] + 0.1 * (params['w'] + updates['w']))
  assert optim.ema_params(state, params)['w'] is state.ema['w']


def test_top_k_accuracy():
  from big_pretrain.evaluators.classification import top_k_accuracy
  logits = np.array([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
  labels = np.array([1, 2, 0])
  assert top_k_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
  assert top_k_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
  assert top_k_accuracy(logits, labels, 3) == 1.0
