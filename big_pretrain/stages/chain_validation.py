"""A run's config, validated whole before its first stage starts.

A run is one stage or a chain (`config.stages`, in order). Each stage is checked
by its kind: a training stage by config/validation.py, a job (config.job) against
its module's declared keys and checks (stages/jobs.py). Then what only the
chain can check: every key that names an earlier stage (a key declared with
`names_stage`: init_from.stage, a job's teacher.stage, a student's
data.pseudo_labels.stage) names one, of the right kind; and the data paths of
every stage exist, and every init_from.checkpoint, so a typo in the third
stage's path stops the run before the first stage trains for a day.
"""

from __future__ import annotations

import importlib.util

from etils import epath

from big_pretrain import schema
from big_pretrain.config.defaults import stage_keys
from big_pretrain.config.validation import (check_keys, check_schema_version, check_values,
                                            unknown_key_error, validate_stage_config)
from big_pretrain.data import data_config
from big_pretrain.errors import ConfigError, UserFacingError
from big_pretrain.stages import jobs
from big_pretrain.stages import init_from as init_from_lib
from big_pretrain.weights import public_checkpoints
from big_pretrain.weights.weight_files import PYTORCH_SUFFIXES

TRAINING = 'training'  # the kind a stage reference may ask for, beside a job's name


def declared_keys(stage_config) -> schema.Group:
  """Every key a stage's config may hold, declared."""
  if jobs.is_job(stage_config):
    return jobs.job_module(stage_config.job).CONFIG_KEYS
  return stage_keys(stage_config.objective.name)


def stage_references(stage_config) -> list[tuple[str, schema.Key, str | None]]:
  """(dotted key, its declaration, its value) of every key of the stage that names a stage."""
  references = []
  for dotted, key in declared_keys(stage_config).walk():
    if isinstance(key, schema.Key) and key.names_stage:
      references.append((dotted, key, _value_at(stage_config, dotted)))
  return references


def stage_kind(stage_config) -> str:
  return stage_config.job if jobs.is_job(stage_config) else TRAINING


def validate_stage(stage_config, path: str) -> None:
  """One stage, by its kind."""
  if not jobs.is_job(stage_config):
    validate_stage_config(stage_config, path)
    return
  check_schema_version(stage_config, path)
  if stage_config.job not in jobs.job_names():
    raise ConfigError(f'{path}.job={stage_config.job!r}: choose one of {jobs.job_names()}.')
  job = jobs.job_module(stage_config.job)
  check_keys(stage_config, job.CONFIG_KEYS, path)
  check_values(stage_config, job.CONFIG_KEYS, path)
  job.check_config(stage_config, path)


def validate_config(config) -> None:
  """A single stage config, or a chain: `config.stages.<name>` in order."""
  if 'stages' not in config:
    validate_stage(config, 'config')
    for dotted, key, value in stage_references(config):
      if value:
        sibling = dotted.rsplit('.', 1)[0] + '.' + key.path_key
        raise ConfigError(
            f'config.{dotted}={value!r} names a stage, but this config has no config.stages. '
            f'Use config.{sibling}=PATH instead.')
    data_config.check_data_exists(config.data)
    check_init_from_exists(config, 'config')
    return
  for key in config.keys():
    if key != 'stages':
      raise unknown_key_error('config', key, ['stages'])
  if not config.stages:
    raise ConfigError('config.stages is empty: give at least one stage.')
  kinds = {}  # the stages before the one checked, and their kinds
  for name, stage in config.stages.items():
    path = f'config.stages.{name}'
    validate_stage(stage, path)
    for dotted, key, value in stage_references(stage):
      if not value:
        continue
      if value not in kinds:
        raise ConfigError(
            f'{path}.{dotted}={value!r} must name an earlier stage; the stages before '
            f'{name!r} are {list(kinds)}.')
      if kinds[value] != key.names_stage:
        what = 'a training stage' if kinds[value] == TRAINING else f'a {kinds[value]} stage'
        wanted = ('a training stage' if key.names_stage == TRAINING
                  else f'a {key.names_stage} stage (job={key.names_stage})')
        raise ConfigError(f'{path}.{dotted}={value!r} is {what}; name {wanted}.')
      if _value_at(stage, dotted.rsplit('.', 1)[0] + '.' + key.path_key):
        raise ConfigError(f'{path}.{dotted.rsplit(".", 1)[0]}: give {dotted.rsplit(".", 1)[1]} '
                          f'or {key.path_key}, not both.')
    kinds[name] = stage_kind(stage)
  for name, stage in config.stages.items():
    data_config.check_data_exists(stage.data, f'config.stages.{name}')
    check_init_from_exists(stage, f'config.stages.{name}')


def check_init_from_exists(stage_config, path: str) -> None:
  """init_from.checkpoint is there and readable here, as far as that is known without
  reading its arrays: public weights are of the format their name says, with a whole header
  (a .pth needs torch); an Orbax checkpoint has a step whose metadata reads."""
  checkpoint = stage_config.init_from.checkpoint if 'init_from' in stage_config else None
  if not checkpoint:
    return
  key = f'{path}.init_from.checkpoint={checkpoint!r}'
  if not epath.Path(checkpoint).exists():
    raise ConfigError(f'{key} does not exist: point it at a step folder, a folder of steps or '
                      "a stage's folder, or at public weights (a timm or Hugging Face folder, a "
                      '.safetensors, .pth or .npz file).')
  if checkpoint.endswith(PYTORCH_SUFFIXES) and importlib.util.find_spec('torch') is None:
    raise ConfigError(f'{key} is a PyTorch file, which needs torch to read: pip install torch '
                      '(CPU is enough), or convert it to .safetensors.')
  try:
    if public_checkpoints.is_public_checkpoint(checkpoint):
      public_checkpoints.check_public_checkpoint(checkpoint)
    else:
      init_from_lib.readable_step_dirs(checkpoint)
  except UserFacingError as error:  # it names the file
    raise ConfigError(f'{path}.init_from.checkpoint: {error}') from error


def _value_at(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node
