"""Stages in order: skip finished ones, resume the interrupted one, chain through checkpoints."""

import json
import os

import jax
import ml_collections
import pytest

from big_pretrain.errors import ConfigError
from big_pretrain.evaluators import evaluator_config
from big_pretrain.stages import chain
from big_pretrain.stages.chain_validation import validate_config
from big_pretrain.storage import stage_dir
from big_pretrain.train import loop
from configs import aim, aim_then_wsp, flip, mae_then_wsp
from helpers.tiny_config import one_device, tiny_mae_config, tiny_wsp_config
from helpers.trees import assert_trees_equal


def tiny_chain():
  config = ml_collections.ConfigDict()
  config.stages = ml_collections.ConfigDict()
  config.stages.mae = tiny_mae_config(total_steps=2)
  config.stages.wsp = tiny_wsp_config()
  config.stages.wsp.total_steps = 4
  config.stages.wsp.checkpoint.every_steps = 2
  config.stages.wsp.init_from.stage = 'mae'
  return config


@pytest.mark.integration
def test_chain_resumes_the_interrupted_stage_and_does_not_redo_the_first(tmp_path, monkeypatch):
  calls = []
  real_train_stage = loop.train_stage

  def interrupted_wsp(config, workdir, **kwargs):
    calls.append(os.path.basename(workdir))
    if workdir.endswith('wsp'):
      kwargs['stop_after_steps'] = 2  # as if killed after step 2 of WSP
    return real_train_stage(config, workdir, **kwargs)

  monkeypatch.setattr(chain, 'train_stage', interrupted_wsp)
  chain.run(tiny_chain(), str(tmp_path), devices=one_device())
  assert calls == ['mae', 'wsp']
  assert max(int(d) for d in os.listdir(tmp_path / 'wsp' / 'checkpoints')) == 2

  calls.clear()
  results = []

  def recording(config, workdir, **kwargs):
    calls.append(os.path.basename(workdir))
    results.append(real_train_stage(config, workdir, **kwargs))
    return results[-1]

  monkeypatch.setattr(chain, 'train_stage', recording)
  chain.run(tiny_chain(), str(tmp_path), devices=one_device())
  assert calls == ['wsp']  # MAE was finished: not run again
  assert results[0].steps_run == 2 and results[0].finished  # WSP went on from step 2

  calls.clear()
  chain.run(tiny_chain(), str(tmp_path), devices=one_device())
  assert calls == []  # everything finished

  # Another run's config into the finished folders is refused with its diff, not skipped.
  for stage, key, value in (('mae', 'objective.mask_ratio', 0.5), ('wsp', 'model.variant', 'Ti/8')):
    other = tiny_chain()
    node = other.stages[stage]
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
    with pytest.raises(ConfigError, match=rf'(?s){stage}.*{key}: .* -> .*skipping it would '
                                          r'report its results.*new --workdir'):
      chain.run(other, str(tmp_path), devices=one_device())
  assert calls == []


@pytest.mark.integration
def test_wsp_starts_from_the_mae_encoder(tmp_path, monkeypatch):
  config = tiny_chain()
  config.stages.wsp.optim.lr_per_256 = 0.0  # WSP leaves the weights where they started
  config.stages.wsp.optim.weight_decay = 0.0
  finals = {}
  real_train_stage = loop.train_stage

  def keep_final(config, workdir, **kwargs):
    result = real_train_stage(config, workdir, **kwargs)
    finals[os.path.basename(workdir)] = jax.device_get(result.state.params)
    return result

  monkeypatch.setattr(chain, 'train_stage', keep_final)
  chain.run(config, str(tmp_path), devices=one_device())
  assert_trees_equal(finals['wsp']['encoder'], finals['mae']['encoder'])


def test_chain_config_names_a_stage_that_is_not_earlier():
  config = tiny_chain()
  config.stages.wsp.init_from.stage = 'maw'
  with pytest.raises(ConfigError, match=r"stages\.wsp\.init_from\.stage='maw'.*\['mae'\]"):
    validate_config(config)
  config = tiny_chain()
  config.unlock()
  config.stagse = 1
  with pytest.raises(ConfigError, match=r'config\.stagse.*stages'):
    validate_config(config)


def test_the_maws_chain_is_mae_l16_then_wsp_and_asks_for_data():
  recipe = mae_then_wsp.get_config()
  assert recipe.stages.mae.model.variant == 'L/16' and recipe.stages.wsp.init_from.stage == 'mae'
  with pytest.raises(ConfigError, match=r'stages\.mae\.data\.path is not set'):
    validate_config(recipe)


def test_flip_config_is_a_masked_then_unmasked_chain():
  recipe = flip.get_config()
  pretrain, unmasked = recipe.stages.pretrain, recipe.stages.unmasked
  assert pretrain.objective.mask_ratio == 0.5 and unmasked.objective.mask_ratio == 0.0
  assert unmasked.optim.lr_per_256 < pretrain.optim.lr_per_256
  assert unmasked.init_from.stage == 'pretrain' and 'text_encoder' in unmasked.init_from.take
  assert pretrain.objective.temperature_init == 0.07 and pretrain.data.text.max_length == 32
  with pytest.raises(ConfigError, match=r'stages\.pretrain\.data\.path is not set'):
    validate_config(recipe)
  recipe.stages.pretrain.data.update(path='/data/train', test_path='/data/val')
  with pytest.raises(ConfigError, match=r'data\.text\.tokenizer is not set'):
    validate_config(recipe)


def test_aim_is_600m_without_a_cls_token_and_chains_into_wsp():
  recipe = aim.get_config()
  assert recipe.model.variant == '600M/14' and not recipe.model.use_cls_token
  assert recipe.evals.attentive_probe.num_last_blocks == 6
  chain = aim_then_wsp.get_config('demo')
  assert chain.stages.wsp.init_from.stage == 'aim'
  assert chain.stages.wsp.model.variant == chain.stages.aim.model.variant


@pytest.mark.integration
def test_at_start_probes_score_the_starting_encoder_and_print_beside_chance(tmp_path, capsys):
  config = tiny_chain()
  mae = config.stages.mae
  mae.optim.update(lr_per_256=0.0, weight_decay=0.0)  # the final encoder is the starting one
  mae.evals.linear_probe = evaluator_config(
      'linear_probe', at_start=True, train_examples=64, test_examples=32, batch_size=32,
      num_steps=50)
  chain.run(config, str(tmp_path), devices=one_device())
  at_start = json.loads((tmp_path / 'mae' / stage_dir.AT_START_RESULTS_FILE).read_text())
  final = json.loads((tmp_path / 'mae' / 'eval_results.json').read_text())
  assert at_start['step'] == 0 and final['step'] == 2
  assert at_start['linear_probe'] == final['linear_probe']
  assert at_start['linear_probe']['chance'] == 1 / 10  # the synthetic shapes' 10 classes
  table = capsys.readouterr().out
  assert 'mae (start)          0  linear_probe' in table
  assert 'chance' in table

  # A finished stage is not scored again; a resumed one keeps the scores of its start.
  (tmp_path / 'mae' / stage_dir.AT_START_RESULTS_FILE).write_text(json.dumps({'step': 0}))
  chain.run(config, str(tmp_path), devices=one_device())
  assert json.loads((tmp_path / 'mae' / stage_dir.AT_START_RESULTS_FILE).read_text()) == {'step': 0}
