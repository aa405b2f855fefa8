"""The extension points are closed: an objective, evaluator, data source or job supplies
everything the central code asks of it, so adding one touches its own module (and its
config file and tests), never the loop, validation or the MFU count."""

import ast
import pathlib

import pytest

from big_pretrain import schema
from big_pretrain.config.defaults import stage_config
from big_pretrain.data import sources
from big_pretrain.data.data_config import DATA_KEYS
from big_pretrain.data.text.labels import synthetic_vocabulary_path
from big_pretrain.data.text.tokenizer import synthetic_tokenizer_path
from big_pretrain.evaluators import evaluator_class, evaluator_names
from big_pretrain.objectives import objective_class, objective_names
from big_pretrain.objectives.objective import Objective
from big_pretrain.stages import jobs
from big_pretrain.stages.chain_validation import validate_config
from big_pretrain.train import mfu

PACKAGE = pathlib.Path(__file__).parents[1] / 'big_pretrain'


def _declared_keys(group: schema.Group):
  return [(name, key) for name, key in group.walk() if isinstance(key, schema.Key)]


def _assert_every_key_is_declared_whole(group: schema.Group, where: str):
  keys = _declared_keys(group)
  assert keys, f'{where} declares no keys'
  for name, key in keys:
    assert isinstance(key.rule, schema.Rule) and key.rule.allowed, (where, name)
    assert len(key.meaning) >= 10, (where, name, key.meaning)
    assert not key.rule.refuses(key.default), (where, name, key.default)


def _small_stage(objective: str):
  """`objective`'s stage config at a CPU size, with the files its data needs."""
  config = stage_config(objective)
  config.model.update(variant='mu/8', scan=False, remat='none')
  config.data.image_size = 32
  config.batch_size = 4
  config.data.labels.vocabulary = synthetic_vocabulary_path()
  config.data.text.tokenizer = synthetic_tokenizer_path()
  return config


@pytest.mark.parametrize('name', objective_names())
def test_each_objective_declares_its_keys_with_rules_and_meanings(name):
  objective = objective_class(name)
  assert objective.name == name and issubclass(objective, Objective)
  _assert_every_key_is_declared_whole(objective.config_keys, f'objective {name!r}')
  assert objective.config_keys['name'].default == name


@pytest.mark.parametrize('name', objective_names())
def test_each_objective_supplies_its_flops_beyond_the_encoder_and_its_encoder_tokens(name):
  objective = objective_class(name)
  assert objective.flops_beyond_encoder.__func__ is not Objective.flops_beyond_encoder.__func__
  config = _small_stage(name)
  patches = objective.encoder_patches(config)
  assert 1 <= patches <= (32 // 8) ** 2
  parts = objective.flops_beyond_encoder(config, patches + 1, num_labels=10)
  assert parts and all(flops > 0 for flops in parts.values()), parts
  assert not any(part.startswith('encoder/') for part in parts)  # the encoder is mfu.py's
  step = mfu.model_flops_breakdown(config, num_labels=10)
  assert set(parts) < set(step.forward)
  assert all(any(part.startswith(prefix) for part in step.forward)
             for prefix in objective.forward_only_parts)


@pytest.mark.parametrize('kind', evaluator_names())
def test_each_evaluator_declares_its_keys_with_rules_and_meanings(kind):
  keys = evaluator_class(kind).config_keys
  _assert_every_key_is_declared_whole(keys, f'evaluator {kind!r}')
  assert keys['kind'].default == kind and 'every_steps' in keys


def test_the_data_config_declares_every_key_and_each_source_is_built():
  _assert_every_key_is_declared_whole(DATA_KEYS, 'config.data')
  assert DATA_KEYS['source'].rule.allowed == f'choose one of {sources.SOURCE_NAMES}'


@pytest.mark.parametrize('name', jobs.job_names())
def test_each_job_declares_its_keys_and_validates_its_defaults_but_the_teacher(name):
  job = jobs.job_module(name)
  _assert_every_key_is_declared_whole(job.CONFIG_KEYS, f'job {name!r}')
  assert job.JOB == name and job.default_config().job == name
  for attribute in ('check_config', 'results', 'run'):
    assert callable(getattr(job, attribute)), attribute


def test_central_modules_name_no_objective():
  """What the issue that closed these extension points asked: no per-objective branch in
  train/ or config/."""
  for folder in ('train', 'config'):
    for path in (PACKAGE / folder).glob('*.py'):
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute):
          assert not (node.left.attr == 'name' and ast.unparse(node.left).endswith(
              'objective.name')), f'{path}: {ast.unparse(node)}'
        if isinstance(node, ast.Constant) and node.value in objective_names():
          raise AssertionError(f'{path}: names objective {node.value!r}')


def test_a_chain_checks_each_stage_reference_by_its_declared_kind():
  """init_from.stage must name a training stage; a student's data.pseudo_labels.stage a
  pseudo-label stage: the declarations say so, the chain checks it."""
  from big_pretrain.config.defaults import chain_config  # pylint: disable=import-outside-toplevel
  first, second = _small_stage('mae'), _small_stage('wsp')
  second.init_from.stage = 'mae'
  validate_config(chain_config(mae=first, wsp=second))
  student = _small_stage('self_training')
  student.data.pseudo_labels.stage = 'mae'
  with pytest.raises(ValueError, match=r"pseudo_labels\.stage='mae' is a training stage; name a "
                                       r'pseudo_label stage \(job=pseudo_label\)'):
    validate_config(chain_config(mae=first, student=student))
