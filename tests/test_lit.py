"""LiT (objectives/lit.py): a text tower trained against an earlier stage's locked image tower."""

import jax
import numpy as np
import optax
import pytest

from big_pretrain import sharding as sharding_lib
from big_pretrain.config.defaults import chain_config, stage_config
from big_pretrain.data.batch_features import random_batch
from big_pretrain.errors import ConfigError
from big_pretrain.stages import chain
from big_pretrain.stages import init_from as init_from_lib
from big_pretrain.stages.chain_validation import validate_config
from big_pretrain.train import mfu, optim
from helpers.tiny_config import (one_device, one_device_trainer, tiny_flip_config, tiny_mae_config,
                                 with_overrides)
from helpers.trees import named_leaves


def tiny_lit_config(**overrides):
  """tiny_flip_config's towers, the image tower shaped as tiny MAE's (cls token)."""
  config = tiny_flip_config()
  text_tower = {key: config.objective[key] for key in ('embed_dim', 'text_width', 'text_depth',
                                                       'text_heads')}
  config.objective = stage_config('lit').objective
  config.objective.update(text_tower)
  config.model.update(use_cls_token=True, pool='cls')
  config.optim.update(ema_decay=0.9, weight_decay=0.05)  # neither may touch the locked tower
  config.checkpoint.every_steps = 2
  config.log.every_steps = 2
  return with_overrides(config, overrides)


@pytest.fixture(scope='module')
def chain_run(tmp_path_factory):
  """MAE -> LiT through the real pipeline: (workdir, results)."""
  workdir = tmp_path_factory.mktemp('mae_lit')
  lit = tiny_lit_config(**{'init_from.stage': 'mae', 'total_steps': 2})
  lit.evals.zero_shot = dict(kind='zero_shot', test_examples=32, batch_size=16,
                             prompts=('a {}', 'a small {}'))
  lit.evals.retrieval = dict(kind='retrieval', test_examples=32, batch_size=16)
  config = chain_config(mae=tiny_mae_config(total_steps=2), lit=lit)
  return workdir, chain.run(config, str(workdir), devices=one_device())


@pytest.mark.integration
def test_a_mae_then_lit_chain_reports_zero_shot_accuracy_beside_chance(chain_run):
  _, results = chain_run
  zero_shot = results['lit']['zero_shot']
  assert 0.0 <= zero_shot['accuracy'] <= 1.0
  assert zero_shot['chance'] == pytest.approx(1 / 10)  # the synthetic data's 10 shapes
  assert 'retrieval' in results['lit']
  table = chain.format_eval_results(results)
  assert 'zero_shot' in table and 'chance' in table


@pytest.mark.integration
def test_the_image_tower_stays_bit_identical_and_holds_no_optimizer_state(chain_run, tmp_path):
  mae_workdir = str(chain_run[0] / 'mae')
  config = tiny_lit_config(**{'init_from.checkpoint': mae_workdir})
  validate_config(config)
  trainer = one_device_trainer(config)
  state = trainer.init_state(jax.random.key(0))
  initialize = chain.initializer_from(config.init_from, str(tmp_path))
  state = state.replace(params=initialize(state.params))  # as the loop starts a stage
  before = named_leaves(jax.device_get(state.params))
  batch = jax.device_put(random_batch(config.data, config.batch_size, np.random.default_rng(0)),
                         sharding_lib.batch_sharding(trainer.mesh))
  for _ in range(3):  # step 1 has lr 0 (warm-up)
    state, metrics = trainer.train_step(state, batch, jax.random.key(1))
  assert np.isfinite(float(metrics['loss']))
  after = named_leaves(jax.device_get(state.params))

  # Every image-tower leaf is MAE's, bit for bit; everything else trained.
  mae_encoder = named_leaves(init_from_lib.read_subtrees(
      init_from_lib.resolve_checkpoint_dir(mae_workdir), ('encoder',)))
  image_tower = sorted(name for name in after if name.startswith('encoder/'))
  assert image_tower == sorted(mae_encoder)
  for name in image_tower:
    assert np.array_equal(after[name], mae_encoder[name]), name
  trained = [name for name in after if not name.startswith('encoder/')]
  assert {name.split('/')[0] for name in trained} == {
      'text_encoder', 'image_projection', 'text_projection', 'logit_scale'}
  unchanged = [name for name in trained if np.array_equal(after[name], before[name])]
  assert not unchanged, unchanged

  # Adam's moments and the EMA exist for the trained leaves only.
  adam = optim.find_state(state.opt_state, optax.ScaleByAdamState)
  moments = sorted(named_leaves(adam.mu))
  assert moments == sorted(trained)
  ema = optim.find_state(state.opt_state, optim.EmaParamsState).ema
  assert sorted(named_leaves(ema)) == sorted(trained)


def test_the_locked_tower_runs_forward_only():
  """No backward through the image tower: the step costs about what the analytic count says."""
  shapes = {'image': jax.ShapeDtypeStruct((16, 32, 32, 3), np.uint8),
            'text_tokens': jax.ShapeDtypeStruct((16, 16), np.int32)}
  lit = tiny_lit_config(**{'init_from.checkpoint': 'unused: nothing is loaded'})
  flip = tiny_flip_config()
  flip.objective.mask_ratio = 0.0
  flip.model.update(use_cls_token=True, pool='cls')  # the same towers, all trained
  # The program as traced (no XLA compile needed): a backward through the locked tower
  # would be in it.
  traced = {name: one_device_trainer(config).lower_step(shapes).cost_analysis()['flops']
            for name, config in (('lit', lit), ('flip', flip))}
  analytic = {name: mfu.model_flops_per_step(config) for name, config in (('lit', lit),
                                                                           ('flip', flip))}
  assert traced['lit'] < 0.6 * traced['flip'], traced
  assert analytic['lit'] < 0.6 * analytic['flip'], analytic


@pytest.mark.parametrize('overrides, message', [
    ({}, 'init_from is not set'),
    ({'init_from.checkpoint': '/runs/wsp', 'init_from.take': ('text_encoder',)},
     "does not take the \"encoder\""),
    ({'init_from.checkpoint': '/runs/wsp', 'objective.mask_ratio': 0.5},
     'objective.mask_ratio=0.5'),
])
def test_a_lit_stage_that_would_lock_a_random_or_masked_tower_is_refused(overrides, message):
  with pytest.raises(ConfigError, match=message):
    validate_config(tiny_lit_config(**overrides))


def test_maws_lit_locks_the_wsp_encoder_as_wsp_built_it():
  from configs import maws_lit
  config = maws_lit.get_config('demo')
  validate_config(config)
  lit, wsp = config.stages.lit, config.stages.wsp
  assert (lit.objective.name, lit.init_from.stage, tuple(lit.init_from.take)) == (
      'lit', 'wsp', ('encoder',))
  assert lit.model.to_dict() == wsp.model.to_dict()  # every parameter fits, pooled the same
