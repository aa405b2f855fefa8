"""Every config file under configs/, with each variant it declares (its VARIANTS), builds and
validates: the CPU-sized ones as they are, the paper-scale ones once the data a user points
them at exists (stand-ins for the data path, vocabulary, tokenizer and pseudo-labels, as
--compile_for uses); an argument a file does not declare is refused."""

import importlib
import pathlib
import re

import pytest

from big_pretrain.errors import ConfigError
from big_pretrain.stages import jobs
from big_pretrain.stages.chain_validation import validate_config
from big_pretrain.compile_for import stage_configs, with_stand_ins

CONFIGS = pathlib.Path(__file__).parents[1] / 'configs'
CONFIG_FILES = sorted(path.stem for path in CONFIGS.glob('*.py') if path.stem != '__init__')
# What a paper-scale config leaves for its user to give, in the words validation uses.
USER_GIVES = re.compile(r'data\.path is not set|data\.text\.tokenizer is not set')
# What a config of a stage that follows another asks for when run alone: a trained model.
FOLLOWS_A_STAGE = re.compile(r'init_from is not set|config\.teacher: give stage')


def _config_file(name: str):
  return importlib.import_module(f'configs.{name}')


def _cases():
  return [pytest.param(name, variant, id=f'{name}:{variant}')
          for name in CONFIG_FILES for variant in _config_file(name).VARIANTS]


def _with_users_data(config, folder: pathlib.Path):
  """`config` with stand-ins for what its user would point it at (a single stage or a
  chain)."""
  stages = stage_configs(config)
  for index, (name, stage) in enumerate(stages.items()):
    if jobs.is_job(stage):  # its teacher is an earlier stage; its images stand in
      stage.data.update(source='synthetic', path=None, test_path=None)
      continue
    stand_in_dir = folder / f'{index}_{name}'
    stand_in_dir.mkdir()
    stages[name], _ = with_stand_ins(stage, str(stand_in_dir))
  if 'stages' not in config:
    return stages['main']
  for name, stage in stages.items():
    config.stages[name] = stage
  return config


def test_every_config_file_declares_its_variants():
  assert len(CONFIG_FILES) >= 15
  for name in CONFIG_FILES:
    variants = _config_file(name).VARIANTS
    assert None in variants and len(set(variants)) == len(variants), name


def _refusal(config) -> str | None:
  try:
    validate_config(config)
  except ConfigError as error:
    return str(error)
  return None


@pytest.mark.parametrize('name, variant', _cases())
def test_each_shipped_config_and_variant_validates(name, variant, tmp_path):
  config = _config_file(name).get_config(variant)
  refusal = _refusal(config)
  if refusal and USER_GIVES.search(refusal):
    assert 'demo' not in (variant or ''), refusal  # a demo runs on the embedded data
    refusal = _refusal(_with_users_data(config, tmp_path))
  # LiT and a pseudo-label job, run alone, start from a run of the user's: that is all they
  # may still ask for.
  assert refusal is None or FOLLOWS_A_STAGE.search(refusal), refusal


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_each_config_file_refuses_a_variant_it_does_not_declare(name):
  with pytest.raises(ValueError, match=r'configs/\w+\.py: (unknown variant|cannot read)'):
    _config_file(name).get_config('no_such_variant')
