"""A training stage's config, validated once, before any compute.

In order: the keys (a key no module declares is named with the closest one: a typo
silently ignored can cost a week of TPU time) and their types; each value against
its declared rule (schema.py); then the checks across keys (the data's, the
model's, the objective's and each evaluator's own `check_config`). Code past this
point reads the keys directly and trusts their values. A chain of stages, and the
stages that are jobs, are validated by stages/chain_validation.py, which calls
`validate_stage_config` for each training stage.
"""

from __future__ import annotations

import difflib
import math

import ml_collections
from absl import logging

from big_pretrain import schema
from big_pretrain import sharding as sharding_lib
from big_pretrain.config.defaults import SCHEMA_VERSION, stage_keys
from big_pretrain.data import data_config
from big_pretrain.data import sources
from big_pretrain.data.data_config import DATA_KEYS
from big_pretrain.errors import ConfigError
from big_pretrain.evaluators import evaluator_class, evaluator_config, evaluator_names
from big_pretrain.evaluators.evaluator import capability_refusal
from big_pretrain.models import vit
from big_pretrain.objectives import objective_class, objective_names


def unknown_key_error(path: str, key: str, known) -> ConfigError:
  close = difflib.get_close_matches(key, list(known), n=3)
  hint = f' Did you mean {", ".join(repr(c) for c in close)}?' if close else ''
  return ConfigError(
      f'Unknown config key {path}.{key}.{hint} Known keys under {path}: '
      f'{", ".join(sorted(known))}.')


def unknown_key_in(config, dotted_key: str) -> ConfigError | None:
  """The error for `dotted_key` ('model.varient') if `config` has no such key, else None."""
  node, path = config, 'config'
  for key in dotted_key.split('.'):
    if not hasattr(node, 'keys') or key not in node:
      known = node.keys() if hasattr(node, 'keys') else []
      return unknown_key_error(path, key, known)
    node, path = node[key], f'{path}.{key}'
  return None


def check_keys(config, declared: schema.Group, path: str) -> None:
  """Raises ConfigError for the first key of `config` that `declared` does not know, or whose
  value is not of its default's type. Free-form groups are checked where they are used."""
  for key in config.keys():
    if key not in declared:
      raise unknown_key_error(path, key, declared.keys())
    expected, value = declared[key], config[key]
    if isinstance(expected, schema.Group):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f'{path}.{key} must be a group of keys, got {value!r}.')
      check_keys(value, expected, f'{path}.{key}')
    elif isinstance(expected, schema.Key) and expected.type is not object:
      _check_type(f'{path}.{key}', expected.default, value)


def _check_type(path: str, expected, value) -> None:
  if expected is None or value is None:  # a placeholder, or a key left unset
    return
  numeric = (int, float)
  if isinstance(expected, bool) != isinstance(value, bool):
    raise ConfigError(f'{path}={value!r}: expected a {type(expected).__name__}.')
  if isinstance(expected, numeric) and isinstance(value, numeric):
    if isinstance(expected, int) and not isinstance(value, int):
      raise ConfigError(f'{path}={value!r}: expected a whole number.')
    return
  if isinstance(expected, (tuple, list)) and isinstance(value, (tuple, list)):
    return
  if type(expected) is not type(value):
    raise ConfigError(
        f'{path}={value!r}: expected a {type(expected).__name__} like {expected!r}.')


def check_values(config, declared: schema.Group, path: str) -> None:
  """Raises ConfigError naming the first key of `config` whose value its declared rule
  refuses, with the rule and the key's meaning."""
  for key in config.keys():
    expected, value = declared.get(key), config[key]
    if isinstance(expected, schema.Group):
      check_values(value, expected, f'{path}.{key}')
    elif isinstance(expected, schema.Key) and expected.rule.refuses(value):
      raise ConfigError(schema.value_error(f'{path}.{key}', value, expected))


def check_schema_version(config, path: str) -> None:
  if config.get('schema_version') != SCHEMA_VERSION:
    raise ConfigError(
        f'{path}.schema_version={config.get("schema_version")!r}: this code reads configs of '
        f'version {SCHEMA_VERSION}, which config/defaults.py builds (stage_config, and a '
        "job's default_config); start the config file from those. (A config.json recorded "
        'by an earlier version is read through config/upgrade.py.)')


def validate_stage_config(config, path: str = 'config') -> None:
  """Raises ConfigError naming the first unknown, ill-typed or out-of-range key of a training
  stage's config, or the first check across keys it fails; warns about suspicious mixes."""
  check_schema_version(config, path)
  objective = config.get('objective', {}).get('name')
  if objective not in objective_names():
    raise ConfigError(
        f'{path}.objective.name={objective!r}: choose one of {objective_names()}.')
  declared = stage_keys(objective)
  check_keys(config, declared, path)
  check_values(config, declared, path)
  logical_names = dict(sharding_lib.DEFAULT_LOGICAL_AXIS_RULES)
  for name in config.get('sharding_rules', {}).keys():
    if name not in logical_names:
      raise unknown_key_error(f'{path}.sharding_rules', name, logical_names)
  # Across keys: each check once.
  data_config.check_config(config.data, path)
  vit.check_fits_images(config.model, config.data.image_size, path)
  _check_second_source_is_read(config, objective, path)
  objective_class(objective).check_config(config, path)
  for name, eval_config in config.get('evals', {}).items():
    _check_evaluator(eval_config, config.data, f'{path}.evals.{name}')
    refusal = capability_refusal(evaluator_class(eval_config.kind), objective_class(objective))
    if refusal:
      raise ConfigError(f'{path}.evals.{name}: {refusal}')
  warn_if_suspicious(config, path)


def _check_second_source_is_read(config, objective: str, path: str) -> None:
  """A second source mixed into the batches (data.sources.second_source) needs an objective
  that tells its rows from the main source's; any other would train on them as its own."""
  key = sources.second_source_key(config.data)
  if key is None or objective_class(objective).reads_second_source:
    return
  readers = [name for name in objective_names() if objective_class(name).reads_second_source]
  raise ConfigError(
      f'{path}.data.{key} is set, but objective {objective!r} would read its rows as rows of '
      f'{path}.data.source: train them with objective {" or ".join(map(repr, readers))}.')


def _check_evaluator(eval_config, stage_data, path: str) -> None:
  kind = eval_config.get('kind')
  if kind not in evaluator_names():
    raise ConfigError(f'{path}.kind={kind!r}: choose one of {evaluator_names()}.')
  declared = evaluator_class(kind).config_keys
  check_keys(eval_config, declared, path)
  # `*_data` keys override keys of config.data for the evaluator's splits.
  data_groups = [key for key in declared if key.endswith('_data')]
  for key in data_groups:
    if key in eval_config:
      check_keys(eval_config[key], DATA_KEYS, f'{path}.{key}')
  merged = evaluator_config(**eval_config)  # what the evaluator will run with
  evaluator_class(kind).check_config(merged, path)  # its checks across keys explain more
  check_values(merged, declared, path)
  for key in data_groups:
    check_values(merged[key], DATA_KEYS, f'{path}.{key}')
    data = stage_data.copy_and_resolve_references()
    data.update(merged[key].to_dict())
    if (sources.SOURCES[data.source].path_holds and data.split == 'test'
        and not data.test_path):
      raise ConfigError(
          f'{path} evaluates on a held-out split, but config.data.test_path is not set. '
          'Point it at held-out images (a folder of class subfolders, e.g. ImageNet val, or '
          f'its converted ArrayRecord folder), or set {path}.{key}.test_path.')


def warn_if_suspicious(config, path: str) -> None:
  """One warning line for each legal but suspicious combination of a stage's values."""
  total = config.total_steps
  warnings = []
  if config.optim.warmup_steps >= total:
    warnings.append(f'{path}.optim.warmup_steps={config.optim.warmup_steps} is not below '
                    f'total_steps={total}: the learning rate never reaches its peak.')
  for key in ('log.every_steps', 'checkpoint.every_steps'):
    group, name = key.split('.')
    if config[group][name] > total:
      warnings.append(f'{path}.{key}={config[group][name]} is above total_steps={total}: '
                      'only the final step does it.')
  for name, evaluator in config.evals.items():
    if evaluator.get('every_steps', 0) > total:
      warnings.append(f'{path}.evals.{name}.every_steps={evaluator.every_steps} is above '
                      f'total_steps={total}: it runs at the final step only.')
  if config.optim.lr_per_256 * config.batch_size / 256 > 0.1:
    warnings.append(f'{path}.optim.lr_per_256={config.optim.lr_per_256} at batch '
                    f'{config.batch_size} is a peak learning rate above 0.1: AdamW usually '
                    'diverges there.')
  for warning in warnings:
    logging.warning('%s', warning)


def check_fits_devices(config, num_devices: int, num_processes: int, num_slices: int = 1) -> None:
  """Raises ConfigError when a stage's mesh or batch cannot be laid over the devices (of
  `num_slices` TPU slices: each stage's mesh is one slice's, sharding.resolve_mesh_shape).

  What the input pipeline would find only after the step has compiled.
  """
  stages = config.stages.items() if 'stages' in config else [('', config)]
  for name, stage in stages:
    path = f'config.stages.{name}' if name else 'config'
    try:
      shape = dict(zip(sharding_lib.MESH_AXES,
                       sharding_lib.resolve_mesh_shape(stage.mesh, num_devices,
                                                         num_slices)))
    except ValueError as error:
      raise ConfigError(str(error).replace('config.mesh', f'{path}.mesh')) from None
    batch_shards = math.prod(shape[axis] for axis in sharding_lib.BATCH_AXES)
    for divisor, what in ((num_processes, 'processes (each loads an equal share)'),
                          (batch_shards, f'devices along the batch axes {sharding_lib.BATCH_AXES} '
                                         f'of the mesh {shape}')):
      if stage.batch_size % divisor:
        raise ConfigError(
            f'{path}.batch_size={stage.batch_size} must be a multiple of the {divisor} '
            f'{what}: use e.g. {(stage.batch_size // divisor + 1) * divisor}.')
