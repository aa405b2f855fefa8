"""A config's validation, before any compute.

Config files start from config/defaults.py, which holds every key with its
default; `validate_stage_config` rejects keys the defaults do not know (a typo
silently ignored can cost a week of TPU time) and names them.
"""

from __future__ import annotations

import difflib
import math

import ml_collections

from big_pretrain import sharding as sharding_lib
from big_pretrain.config.defaults import (PSEUDO_LABEL_KINDS, SCHEMA_VERSION, default_data_config,
                                          is_pseudo_label_config, pseudo_label_config,
                                          stage_config)
from big_pretrain.config.value_rules import check_values, warn_if_suspicious
from big_pretrain.data import augment as augment_lib
from big_pretrain.data import sources as sources_lib
from big_pretrain.data.text import labels as labels_lib
from big_pretrain.data.text import tokenizer_files
from big_pretrain.errors import ConfigError
from big_pretrain.evaluators import (evaluator_class, evaluator_config, evaluator_defaults,
                                     evaluator_names)
from big_pretrain.models import vit as vit_lib
from big_pretrain.models.attention import ATTENTION_IMPLS
from big_pretrain.models.transformer import REMAT_AUTO, REMAT_POLICIES
from big_pretrain.objectives import objective_class, objective_names
from big_pretrain.storage.files import is_bucket


def validate_pseudo_label_config(config, path: str = 'config') -> None:
  _check_schema_version(config, path)
  schema = pseudo_label_config()
  _check_against({k: v for k, v in config.items() if k != 'sharding_rules'},
                 {k: v for k, v in schema.items() if k != 'sharding_rules'} | {
                     'sharding_rules': None}, path)
  _check_data_is_given(config.data, path)
  labels = config.labels
  if labels.kind not in PSEUDO_LABEL_KINDS:
    raise ConfigError(f'{path}.labels.kind={labels.kind!r}: choose one of {PSEUDO_LABEL_KINDS}.')
  if not 0.0 <= labels.threshold < 1.0:
    raise ConfigError(f'{path}.labels.threshold={labels.threshold}: must be in [0, 1) (the '
                      "teacher's top probability an image needs to be labelled).")
  if bool(config.teacher.stage) == bool(config.teacher.workdir):
    raise ConfigError(
        f'{path}.teacher: give stage (an earlier stage of config.stages) or workdir (the '
        'folder of a finished stage with a classification head), exactly one of them.')
  check_values(config, path)


def _unknown_key_error(path: str, key: str, known) -> ConfigError:
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
      return _unknown_key_error(path, key, known)
    node, path = node[key], f'{path}.{key}'
  return None


def _check_against(config, schema, path: str) -> None:
  for key in config.keys():
    if key not in schema:
      raise _unknown_key_error(path, key, schema.keys())
    expected, value = schema[key], config[key]
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f'{path}.{key} must be a group of keys, got {value!r}.')
      _check_against(value, expected, f'{path}.{key}')
    elif (expected is not None and value is not None
          and not f'{path}.{key}'.endswith(_CHECKED_BY_VALUE)):
      _check_type(f'{path}.{key}', expected, value)


# Keys that take values of more than one type, checked by value (_check_model_choices).
_CHECKED_BY_VALUE = ('.model.scan',)  # True, False or 'auto'


def _check_type(path: str, expected, value) -> None:
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


def _check_schema_version(config, path: str) -> None:
  if config.get('schema_version') != SCHEMA_VERSION:
    raise ConfigError(
        f'{path}.schema_version={config.get("schema_version")!r}: this code reads configs of '
        f'version {SCHEMA_VERSION}, which config/defaults.py builds (stage_config, '
        'pseudo_label_config); start the config file from those. (A config.json recorded by '
        'an earlier version is read through config/upgrade.py.)')


def validate_stage_config(config, path: str = 'config') -> None:
  """Raises ConfigError naming the first unknown or ill-typed key, or missing data."""
  _check_schema_version(config, path)
  objective = config.get('objective', {}).get('name')
  if objective not in objective_names():
    raise ConfigError(
        f'{path}.objective.name={objective!r}: choose one of {objective_names()}.')
  schema = stage_config(objective)
  free_form = ('sharding_rules', 'evals')
  _check_against(
      {k: v for k, v in config.items() if k not in free_form},
      {k: v for k, v in schema.items() if k not in free_form} | {k: None for k in free_form},
      path)
  logical_names = dict(sharding_lib.DEFAULT_LOGICAL_AXIS_RULES)
  for name in config.get('sharding_rules', {}).keys():
    if name not in logical_names:
      raise _unknown_key_error(f'{path}.sharding_rules', name, logical_names)
  _check_data_is_given(config.data, path)
  _check_augmentation(config.data, path)
  for name, eval_config in config.get('evals', {}).items():
    _check_evaluator(eval_config, config.data, f'{path}.evals.{name}')
  if config.init_from.stage and config.init_from.checkpoint:
    raise ConfigError(f'{path}.init_from: give stage or checkpoint, not both.')
  _check_model_choices(config.model, f'{path}.model')
  _check_image_size_fits_patch(config, path)
  pseudo_labels = config.data.pseudo_labels
  if (pseudo_labels.stage or pseudo_labels.path) and objective != 'self_training':
    raise ConfigError(
        f'{path}.data.pseudo_labels is set, but objective {objective!r} would read the '
        "pseudo-labelled rows as unlabelled ones: train them with objective 'self_training'.")
  objective_class(objective).check_config(config, path)
  check_values(config, path)  # every key's range, after the checks that explain more
  warn_if_suspicious(config, path)


def validate_config(config) -> None:
  """A single stage config, or a chain: `config.stages.<name>` in order."""
  if 'stages' not in config:
    if is_pseudo_label_config(config):
      validate_pseudo_label_config(config)
      if config.teacher.stage:
        raise ConfigError(
            f'config.teacher.stage={config.teacher.stage!r} names a stage, but this config has '
            'no config.stages. Use config.teacher.workdir=STAGE_FOLDER instead.')
      check_data_exists(config.data)
      return
    validate_stage_config(config)
    if config.init_from.stage:
      raise ConfigError(
          f'config.init_from.stage={config.init_from.stage!r} names a stage, but this config '
          'has no config.stages. Use config.init_from.checkpoint=PATH instead.')
    if config.data.pseudo_labels.stage:
      raise ConfigError(
          f'config.data.pseudo_labels.stage={config.data.pseudo_labels.stage!r} names a '
          'stage, but this config has no config.stages. Use config.data.pseudo_labels.path.')
    check_data_exists(config.data)
    return
  for key in config.keys():
    if key != 'stages':
      raise _unknown_key_error('config', key, ['stages'])
  if not config.stages:
    raise ConfigError('config.stages is empty: give at least one stage.')
  earlier, pseudo_label_stages = [], []
  for name, stage in config.stages.items():
    path = f'config.stages.{name}'
    if is_pseudo_label_config(stage):
      validate_pseudo_label_config(stage, path)
      named = {f'{path}.teacher.stage': stage.teacher.stage}
    else:
      validate_stage_config(stage, path)
      named = {f'{path}.init_from.stage': stage.init_from.stage,
               f'{path}.data.pseudo_labels.stage': stage.data.pseudo_labels.stage}
      source = stage.data.pseudo_labels.stage
      if source and source in earlier and source not in pseudo_label_stages:
        raise ConfigError(f'{path}.data.pseudo_labels.stage={source!r} is a training stage; '
                          'name a pseudo-label stage (job=pseudo_label).')
    for key, source in named.items():
      if source and source not in earlier:
        raise ConfigError(
            f'{key}={source!r} must name an earlier stage; the stages before {name!r} are '
            f'{earlier}.')
      if source and source in pseudo_label_stages and not key.endswith('pseudo_labels.stage'):
        raise ConfigError(f'{key}={source!r} is a pseudo-label stage, which has no model.')
    if is_pseudo_label_config(stage):
      pseudo_label_stages.append(name)
    earlier.append(name)
  for name, stage in config.stages.items():
    check_data_exists(stage.data, f'config.stages.{name}')


def check_data_exists(data, path: str = 'config') -> None:
  """Raises ConfigError when a local data.path or data.test_path holds no images or shards.

  Part of `validate_config` (a whole run, every stage of a chain before the
  first starts), not of `validate_stage_config`, which checks a config alone.
  """
  for key in ('path', 'test_path'):
    location = data.get(key)
    if not location or is_bucket(location):  # a bucket is found when the stage reads it
      continue
    try:
      sources_lib.check_has_data(data.source, location)
    except (OSError, ValueError) as error:
      raise ConfigError(f'{path}.data.{key}: {error}') from None
  _check_text_files_read(data, path)


def _check_text_files_read(data, path: str) -> None:
  """The label vocabulary and the tokenizer, when local, are read once now (they are small):
  a damaged one is named before any compile, not after."""
  files = {'labels.vocabulary': (data.labels.vocabulary, labels_lib.LabelVocabulary.from_file),
           'text.tokenizer': (data.text.tokenizer, tokenizer_files.load_tokenizer)}
  for key, (location, read) in files.items():
    if not location or is_bucket(location):
      continue
    try:
      read(location)
    except (OSError, ValueError, ImportError) as error:  # ImportError: no sentencepiece
      raise ConfigError(f'{path}.data.{key}: {error}') from None


def check_fits_devices(config, num_devices: int, num_processes: int) -> None:
  """Raises ConfigError when a stage's mesh or batch cannot be laid over the devices.

  What the input pipeline would find only after the step has compiled.
  """
  stages = config.stages.items() if 'stages' in config else [('', config)]
  for name, stage in stages:
    path = f'config.stages.{name}' if name else 'config'
    try:
      shape = dict(zip(sharding_lib.MESH_AXES,
                       sharding_lib.resolve_mesh_shape(stage.mesh, num_devices)))
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


def _check_model_choices(model, path: str) -> None:
  if not isinstance(model.scan, bool) and model.scan != vit_lib.SCAN_AUTO:
    raise ConfigError(
        f'{path}.scan={model.scan!r}: choose True, False or {vit_lib.SCAN_AUTO!r}. (A model '
        'config copied with copy_and_resolve_references keeps its value as a string, so a '
        'command-line True arrives as the text; set it in the config file instead.)')
  remat_choices = (REMAT_AUTO, *REMAT_POLICIES)
  if model.remat not in remat_choices:
    raise ConfigError(f'{path}.remat={model.remat!r}: choose one of {remat_choices}.')
  if model.attention_impl is not None and model.attention_impl not in ATTENTION_IMPLS:
    raise ConfigError(f'{path}.attention_impl={model.attention_impl!r}: choose one of '
                      f'{ATTENTION_IMPLS}.')
  if model.patch_embed_impl not in vit_lib.PATCH_EMBED_IMPLS:
    raise ConfigError(f'{path}.patch_embed_impl={model.patch_embed_impl!r}: choose one of '
                      f'{vit_lib.PATCH_EMBED_IMPLS}.')


def _check_image_size_fits_patch(config, path: str) -> None:
  try:
    patch = vit_lib.parse_variant(config.model.variant).patch_size
  except ValueError as error:
    raise ConfigError(f'{path}.model.variant: {error}') from None
  size = config.data.image_size
  if size % patch:
    raise ConfigError(
        f'{path}.data.image_size={size} is not a multiple of the patch size {patch} of '
        f'{path}.model.variant={config.model.variant!r}: use e.g. '
        f'{max(patch, size // patch * patch)} or {(size // patch + 1) * patch}.')


def _check_evaluator(eval_config, stage_data, path: str) -> None:
  kind = eval_config.get('kind')
  if kind not in evaluator_names():
    raise ConfigError(f'{path}.kind={kind!r}: choose one of {evaluator_names()}.')
  schema = evaluator_defaults(kind)
  # `*_data` groups override keys of config.data for the evaluator's splits.
  data_groups = [key for key in schema.keys() if key.endswith('_data')]
  for key in data_groups:
    schema[key] = default_data_config()
  _check_against(eval_config, schema, path)
  merged = evaluator_config(**eval_config)  # what the evaluator will run with
  evaluator_class(kind).check_config(merged, path)
  for key in data_groups:
    data = stage_data.copy_and_resolve_references()
    data.update(merged[key].to_dict())
    if (data.source in ('image_folder', 'array_record') and data.split == 'test'
        and not data.test_path):
      raise ConfigError(
          f'{path} evaluates on a held-out split, but config.data.test_path is not set. '
          'Point it at held-out images (a folder of class subfolders, e.g. ImageNet val, or '
          f'its converted ArrayRecord folder), or set {path}.{key}.test_path.')


def _check_augmentation(data, path: str) -> None:
  try:
    augment_lib.parse_augment(data.augment)
    augment_lib.check_augment_settings(
        randaugment_ops=data.randaugment_ops, randaugment_magnitude=data.randaugment_magnitude,
        randaugment_magnitude_std=data.randaugment_magnitude_std,
        erasing_prob=data.erasing_prob, scale_jitter=tuple(data.scale_jitter))
  except ValueError as error:
    raise ConfigError(str(error).replace('config.data.', f'{path}.data.')) from None
  if not 0 < data.eval_crop_fraction <= 1:
    raise ConfigError(f'{path}.data.eval_crop_fraction={data.eval_crop_fraction}: must be in '
                      '(0, 1] (0.875 crops 224 of 256).')


def _check_data_is_given(data, path: str) -> None:
  if data.source == 'synthetic':
    return
  if data.source == 'tfds':
    if not data.get('tfds_name'):
      raise ConfigError(
          f"{path}.data.tfds_name is not set, and {path}.data.source='tfds' needs it: the name "
          "of a TFDS dataset prepared with file_format='array_record' (`tfds build NAME "
          '--file_format=array_record`), with --config.data.tfds_data_dir=ITS_DATA_DIR.')
    return
  if data.source == 'array_record' and not data.get('path'):
    raise ConfigError(
        f"{path}.data.path is not set, and {path}.data.source='array_record' needs it. Point "
        'it at a folder written by `python -m big_pretrain.data.convert --input=IMAGES_OR_TARS '
        '--output=DIR`, e.g. --config.data.path=DIR.')
  if not data.get('path'):
    raise ConfigError(
        f'{path}.data.path is not set, and {path}.data.source={data.source!r} needs it. '
        'Point it at your data, e.g. --config.data.path=/data/imagenet/train (a folder '
        'of class subfolders of JPEG/PNG images, optional .txt captions beside them), '
        'or try the embedded synthetic data with the ":demo" config variant '
        '(e.g. --config=configs/mae.py:demo).')
