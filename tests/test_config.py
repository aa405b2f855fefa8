"""Configs: every bad key is named before any compute; the recipes validate."""

import json
import logging
import pathlib
import re

import ml_collections
import pytest

from big_pretrain import schema
from big_pretrain.config.defaults import SCHEMA_VERSION, stage_config, stage_keys
from big_pretrain.config import upgrade as upgrade_lib
from big_pretrain.config.upgrade import upgrade
from big_pretrain.config.validation import validate_stage_config
from big_pretrain.data.data_config import DATA_KEYS
from big_pretrain.data.text.labels import synthetic_vocabulary_path
from big_pretrain.errors import ConfigError, DamagedFileError
from big_pretrain.evaluators import evaluator_config, evaluator_keys, evaluator_names
from big_pretrain.objectives import objective_names
from big_pretrain.stages import jobs
from big_pretrain.storage import checkpoints
from configs import mae as mae_config
from configs import wsp as wsp_config


def test_paper_recipe_is_mae_l16_and_asks_for_data():
  config = mae_config.get_config()
  assert config.model.variant == 'L/16'
  assert config.batch_size == 4096
  assert config.objective.mask_ratio == 0.75
  with pytest.raises(ConfigError, match=r'config\.data\.path is not set.*:demo'):
    validate_stage_config(config)
  config.data.path = '/data/imagenet/train'
  with pytest.raises(ConfigError, match=r'evals\.reconstruction .*config\.data\.test_path'):
    validate_stage_config(config)  # the reconstruction grid shows held-out images
  config.data.test_path = '/data/imagenet/val'
  validate_stage_config(config)


@pytest.mark.parametrize('dotted, suggestion', [
    ('totl_steps', 'total_steps'),
    ('model.varient', 'variant'),
    ('objective.mask_ration', 'mask_ratio'),
    ('optim.weight_decy', 'weight_decay'),
])
def test_unknown_key_is_named_with_a_suggestion(dotted, suggestion):
  config = mae_config.get_config('demo')
  *parents, leaf = dotted.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  node.unlock()
  node[leaf] = 1
  with pytest.raises(ConfigError, match=rf'config\.{dotted}\b.*{suggestion}'):
    validate_stage_config(config)


def test_wrong_type_is_named():
  # A config built by hand (not from stage_config) has no type safety of its own.
  config = ml_collections.ConfigDict(mae_config.get_config('demo').to_dict(), type_safe=False)
  config.total_steps = 'many'
  with pytest.raises(ConfigError, match=r'config\.total_steps'):
    validate_stage_config(config)


def test_unknown_objective_evaluator_and_sharding_rule_are_named():
  config = mae_config.get_config('demo')
  config.objective.name = 'mea'
  with pytest.raises(ConfigError, match=r"objective\.name='mea'.*mae"):
    validate_stage_config(config)
  config = mae_config.get_config('demo')
  config.evals.reconstruction.kind = 'recon'
  with pytest.raises(ConfigError, match=r"evals\.reconstruction\.kind='recon'"):
    validate_stage_config(config)
  config = mae_config.get_config('demo')
  config.evals.reconstruction.unlock()
  config.evals.reconstruction.num_imgs = 4
  with pytest.raises(ConfigError, match=r'evals\.reconstruction\.num_imgs.*num_images'):
    validate_stage_config(config)
  config = mae_config.get_config('demo')
  config.sharding_rules.embedding = 'fsdp'
  with pytest.raises(ConfigError, match=r'sharding_rules\.embedding.*embed'):
    validate_stage_config(config)


@pytest.mark.parametrize('name, stages', [
    ('mae_then_wsp', ['mae', 'wsp']), ('mae_then_finetune', ['mae', 'finetune']),
    ('maws', ['mae', 'wsp', 'finetune']), ('flip', ['pretrain', 'unmasked']),
    ('aim_then_wsp', ['aim', 'wsp']), ('maws_lit', ['mae', 'wsp', 'lit'])])
def test_chains_run_their_stages_in_the_order_written_not_by_name(name, stages):
  import importlib
  from big_pretrain.stages import chain
  from big_pretrain.stages.chain_validation import validate_config
  config = importlib.import_module(f'configs.{name}').get_config('demo')
  validate_config(config)  # each init_from.stage names an earlier stage
  assert list(config.stages) == stages
  assert list(chain.stage_workdirs(config, '/w')) == stages


@pytest.mark.parametrize('variant, layer_decay, drop_path', [
    ('B', 0.65, 0.1), ('L', 0.75, 0.2), ('H', 0.75, 0.3)])
def test_finetune_recipes_are_maes_and_ask_for_data(variant, layer_decay, drop_path):
  from big_pretrain.stages.chain_validation import validate_config
  from configs import finetune
  config = finetune.get_config(variant)
  assert (config.optim.layer_decay, config.model.drop_path) == (layer_decay, drop_path)
  assert config.optim.lr_per_256 == (5e-4 if variant == 'B' else 1e-3)
  assert (config.optim.b1, config.optim.b2, config.optim.weight_decay) == (0.9, 0.999, 0.05)
  assert (config.objective.mixup_alpha, config.objective.cutmix_alpha,
          config.objective.label_smoothing) == (0.8, 1.0, 0.1)
  assert config.data.augment == 'crop+flip+randaugment+erasing'
  assert config.data.erasing_prob == 0.25 and config.data.randaugment_magnitude == 9
  with pytest.raises(ConfigError, match=r'config\.data\.path is not set'):
    validate_config(config)


# --- Recorded configs of earlier schema versions (config/upgrade.py) ---------------------

# A WSP stage's config.json as the code of commit 6d94fda recorded it (version 1: no
# schema_version, no patch_embed_impl or decode_at_crop_scale; its vocabulary path replaced).
RECORDED_BEFORE_SCHEMA_VERSIONS = (
    pathlib.Path(__file__).parent / 'data' / 'wsp_config_recorded_before_schema_versions.json')


def test_a_version_1_record_upgrades_to_a_complete_config_that_means_the_same(caplog):
  recorded = json.loads(RECORDED_BEFORE_SCHEMA_VERSIONS.read_text())
  recorded['data']['tfds_shuffle'] = True  # a key a later schema dropped
  with caplog.at_level(logging.INFO):
    config = upgrade(recorded, where='teacher/config.json')
  assert 'teacher/config.json: keys this version of the code no longer has, ignored: ' \
         'data.tfds_shuffle.' in caplog.text
  assert config.schema_version == SCHEMA_VERSION
  # Keys added since, at what the code did without them.
  assert config.data.decode_at_crop_scale is False and config.model.scan is False
  assert config.model.patch_embed_impl == 'matmul'
  # What was recorded, with the schema's types (JSON has no tuples).
  assert config.total_steps == 600 and config.model.variant == 'mu/8'
  assert config.data.crop_scale == (0.35, 1.0) and config.data.scale_jitter == (0.5, 2.0)
  assert config.evals.linear_probe.kind == 'linear_probe'
  assert config.data.labels.vocabulary == '/data/run/vocabulary.txt'
  config.data.labels.vocabulary = synthetic_vocabulary_path()
  validate_stage_config(config)


def test_a_record_of_today_upgrades_to_itself_and_a_newer_one_is_refused():
  config = mae_config.get_config('demo')
  recorded = json.loads(config.to_json_best_effort())
  assert upgrade(recorded, where='config.json').to_dict() == config.to_dict()
  recorded['schema_version'] = SCHEMA_VERSION + 1
  with pytest.raises(ConfigError, match=rf'schema_version={SCHEMA_VERSION + 1}.*newer version of '
                     'big_pretrain'):
    upgrade(recorded, where='config.json')
  config.schema_version = 1
  with pytest.raises(ConfigError, match=r'config\.schema_version=1: .*config/defaults\.py'):
    validate_stage_config(config)


# The keys every training stage's config had at schema version 3, per objective: what a
# config.json written by version 3 must hold. Written once, never regenerated: a key added
# since belongs to a later version (config/upgrade.py KEYS_ADDED_IN_VERSION).
KEYS_OF_SCHEMA_VERSION_3 = pathlib.Path(__file__).parent / 'data' / (
    'config_keys_schema_version_3.json')


def test_a_record_is_asked_only_for_keys_its_version_had():
  """A key added to the schema without a new version would make every record of the
  current version look damaged: expected_keys must stay within what each version had."""
  had = json.loads(KEYS_OF_SCHEMA_VERSION_3.read_text())
  for objective in objective_names():
    expected = upgrade_lib.expected_keys({'objective': {'name': objective}}, 3)
    added = sorted(set(expected) - set(had[objective]))
    assert not added, (
        f'{objective}: {added} are not keys of schema version 3: adding a key is a new '
        'schema version (config/defaults.py SCHEMA_VERSION + 1, the key listed in '
        'config/upgrade.py KEYS_ADDED_IN_VERSION).')
  recorded_v1 = json.loads(RECORDED_BEFORE_SCHEMA_VERSIONS.read_text())
  assert upgrade_lib.check_whole(recorded_v1, 'config.json') == 1  # holds the keys of every version
  # Every stage config.json of this version on is written by code that saves digests.
  assert SCHEMA_VERSION >= checkpoints.DIGESTS_SINCE_SCHEMA_VERSION


@pytest.mark.parametrize('lost, version, written_by', [
    ('model.variant', SCHEMA_VERSION, None),
    ('seed', SCHEMA_VERSION, None),
    ('objective', SCHEMA_VERSION, None),
    ('batch_size', 1, None),                # a key every version had
    ('data.labels.vocabulary', SCHEMA_VERSION, None),
    ('schema_version', None, SCHEMA_VERSION),  # reads as version 1; its history says 3
])
def test_a_record_that_lacks_keys_its_version_had_is_damaged_and_named(lost, version,
                                                                      written_by):
  recorded = json.loads(wsp_config.get_config('demo').to_json_best_effort())
  if version is not None:
    recorded['schema_version'] = version
  node = recorded
  *parents, leaf = lost.split('.')
  for parent in parents:
    node = node[parent]
  del node[leaf]
  with pytest.raises(DamagedFileError, match=r'^wsp/config\.json lacks keys that every config '
                     r'written by its version \(schema_version \d\) holds: .*'
                     + re.escape(lost.split('.')[0])) as refusal:
    upgrade(recorded, where='wsp/config.json', written_by=written_by)
  assert '\n' not in str(refusal.value)


# --- Every key's values (declared with the key: schema.py) -------------------------------

def _leaf_values(config, prefix: str = ''):
  """(dotted key, value) of every leaf of `config`."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaf_values(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _all_default_keys():
  """(where, dotted key, declaration, default) of every key of every objective's stage config,
  every evaluator's config (its data overrides as the data keys they override) and every
  job's config."""
  keys = []
  for objective in objective_names():
    declared = stage_keys(objective)
    keys += [(objective, key, declared.find(key), value)
             for key, value in _leaf_values(stage_config(objective))]
  for kind in evaluator_names():
    declared = evaluator_keys(kind)
    config = evaluator_config(kind)
    for group in [key for key in config if key.endswith('_data')]:
      keys += [(kind, f'{group}.{key}', DATA_KEYS.find(key), value)
               for key, value in _leaf_values(DATA_KEYS.defaults())]
      del config[group]
    keys += [(kind, key, declared.find(key), value) for key, value in _leaf_values(config)]
  for job in jobs.job_names():
    declared = jobs.job_module(job).CONFIG_KEYS
    keys += [(job, key, declared.find(key), value)
             for key, value in _leaf_values(jobs.job_module(job).default_config())]
  return keys


def test_every_key_of_every_default_config_has_a_rule_for_its_values():
  keys = _all_default_keys()
  assert len({(where, key) for where, key, _, _ in keys}) > 200
  assert not sorted((where, key) for where, key, declared, _ in keys
                    if not isinstance(declared, schema.Key))
  # ... that its own default passes, and a meaning to show beside a value it refuses.
  assert not sorted((where, key, default) for where, key, declared, default in keys
                    if declared.rule.refuses(default))
  assert not sorted((where, key) for where, key, declared, _ in keys
                    if len(declared.meaning) < 10)


@pytest.mark.parametrize('key, value, message', [
    ('model.dtype', 'float64', r"model\.dtype='float64': choose one of \('float32', 'bfloat16'\)"),
    ('optim.lr_per_256', -1e-3, r'optim\.lr_per_256=-0\.001: must be a number >= 0'),
    ('optim.b2', 1.5, r'optim\.b2=1\.5: must lie in \[0, 1\)'),
    ('optim.clip_grad_norm', 0.0, r'optim\.clip_grad_norm=0\.0: must be a number > 0 \(or None\)'),
    ('model.drop_path', 1.0, r'model\.drop_path=1\.0: must lie in \[0, 1\)'),
    ('data.crop_scale', (0.5, 0.2), r'data\.crop_scale=\(0\.5, 0\.2\): must be \(min, max\)'),
    ('data.num_threads', 0, r'data\.num_threads=0: must be an integer >= 1 \(or None\)'),
    ('mesh.fsdp', 0, r'mesh\.fsdp=0: must be -1 .* or an integer >= 1'),
    ('checkpoint.keep', 0, r'checkpoint\.keep=0: must be an integer >= 1'),
    ('evals.knn.k', 0, r'evals\.knn\.k=0 must lie in \[1, train_examples=2048\]'),
    ('evals.knn.batch_size', 0, r'evals\.knn\.batch_size=0'),
    ('evals.knn.test_data.split', 'val', r"evals\.knn\.test_data\.split='val': choose one of"),
    ('data.text.max_length', 1, r'data\.text\.max_length=1: must be an integer >= 2'),
])
def test_a_value_out_of_range_is_named_in_one_line_before_any_compute(key, value, message):
  config = mae_config.get_config('demo')
  config.evals.knn = evaluator_config('knn')
  *parents, leaf = key.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  with pytest.raises(ConfigError, match=rf'^config\.{message}') as refusal:
    validate_stage_config(config)
  assert '\n' not in str(refusal.value)


def test_legal_but_suspicious_values_are_warned_about_in_one_line_each(caplog):
  config = mae_config.get_config('demo')
  config.update(total_steps=100)
  config.optim.warmup_steps = 200
  config.log.every_steps = 500
  config.evals.knn = evaluator_config('knn', every_steps=1000)
  config.evals.reconstruction.every_steps = 50
  with caplog.at_level(logging.WARNING):
    validate_stage_config(config)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 3 and all('\n' not in w for w in warnings)
  assert 'optim.warmup_steps=200 is not below total_steps=100' in warnings[0]
  assert 'log.every_steps=500 is above total_steps=100' in warnings[1]
  assert 'evals.knn.every_steps=1000 is above total_steps=100' in warnings[2]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    validate_stage_config(mae_config.get_config('demo'))
  assert not [r for r in caplog.records if r.levelno == logging.WARNING]
