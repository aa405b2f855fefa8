"""Configs that an earlier version of the code recorded, brought to today's schema.

A stage records its config in its folder (storage/stage_dir.py: config.json), and
other stages read it back (a pseudo-label job reads its teacher's). Every config
carries `schema_version`; one recorded before the key existed is version 1.
`upgrade` turns a recorded config of any version into a complete one of
SCHEMA_VERSION: today's defaults for its objective, overlaid with what was
recorded, and for each key added since, the value that reproduces what the code
did without it. So the code reads every key directly: no `.get(key, fallback)`
standing in for the schema's history.

A record that lacks keys the version which wrote it had is damaged (a hand edit, or a file
written over it), never a schema change: `check_whole` refuses it, naming the keys. From
version 3 on a record holds every key of its version's schema; the keys added since a
version are listed in KEYS_ADDED_IN_VERSION, so adding a key to the schema is a new version
(tests/test_config.py holds the keys of version 3 and keeps the list honest).
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
from absl import logging

from big_pretrain.config.defaults import SCHEMA_VERSION, stage_config, stage_keys
from big_pretrain.objectives import objective_names
from big_pretrain.errors import ConfigError, DamagedFileError

# The keys whose default changed when they were added: what a config recorded without them
# meant. (Every other key added to the schema defaults to what its absence meant.)
_MEANING_OF_ABSENT_KEYS_IN_VERSION_1 = {
    'model.scan': False,                   # layers were unrolled unless asked
    'model.attention_impl': 'xla',         # XLA's attention before the cuDNN choice
    'data.decode_at_crop_scale': False,    # JPEGs were decoded whole
}


# The keys every record has held since configs were first recorded (version 1): what a
# record of versions 1 and 2, whose schemas grew without a version, must have at least.
KEYS_OF_EVERY_VERSION = (
    'seed', 'total_steps', 'batch_size', 'model.variant', 'model.use_cls_token', 'model.pool',
    'model.posemb', 'objective.name', 'optim.lr_per_256', 'optim.weight_decay',
    'optim.warmup_steps', 'data.source', 'data.image_size')
# The first version whose records hold every key of their schema.
FIRST_WHOLE_VERSION = 3
# The keys (dotted) each version after FIRST_WHOLE_VERSION added; a record of an earlier
# version lacks them, legitimately. Adding a key to the schema: SCHEMA_VERSION + 1, listed here.
KEYS_ADDED_IN_VERSION: dict[int, tuple[str, ...]] = {4: ('log.example_keys',)}


def upgrade(recorded: Mapping[str, Any], where: str,
            written_by: int | None = None) -> ml_collections.ConfigDict:
  """A recorded training stage's config (a dict from JSON) as a complete config of
  SCHEMA_VERSION. `where` names the file, for errors; `written_by`: the schema version that
  other records of the stage (its history) say wrote it, if known (`check_whole`). Keys the
  schema no longer has are dropped, and logged."""
  version = check_whole(recorded, where, written_by)
  objective = recorded['objective']['name']
  if objective not in objective_names():
    raise ConfigError(f'{where} names no known objective ({objective!r}).')
  config = stage_config(objective)
  config.unlock()
  dropped = _overlay(config, recorded, '', absent=(
      _MEANING_OF_ABSENT_KEYS_IN_VERSION_1 if version == 1 else {}))
  if dropped:
    logging.info('%s: keys this version of the code no longer has, ignored: %s.', where,
                 ', '.join(dropped))
  config.schema_version = SCHEMA_VERSION
  return config


def _overlay(config: ml_collections.ConfigDict, recorded: Mapping[str, Any], prefix: str,
             absent: Mapping[str, Any]) -> list[str]:
  """Sets `config`'s keys to the recorded values (JSON lists become the schema's tuples),
  keys the record lacks to `absent`'s meaning where it has one; returns the dropped keys."""
  dropped = []
  for key in list(config.keys()):
    dotted = f'{prefix}{key}'
    if key not in recorded:
      if dotted in absent:
        config[key] = absent[dotted]
      continue
    value = recorded[key]
    if isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, Mapping):
      if not config[key]:  # free-form groups (evals, sharding_rules): taken as recorded
        config[key] = ml_collections.ConfigDict(dict(value))
      else:
        dropped += _overlay(config[key], value, f'{dotted}.', absent)
    else:
      config[key] = tuple(value) if isinstance(value, list) else value
  dropped += [f'{prefix}{key}' for key in recorded if key not in config]
  return dropped


def check_whole(recorded: Mapping[str, Any], where: str, written_by: int | None = None) -> int:
  """The schema version of a recorded config, once it is known to hold every key that
  version had. DamagedFileError naming the missing keys otherwise; ConfigError for a version
  newer than this code. `written_by`: a version other records of the stage show (the
  history's), which a record cannot claim to be older than."""
  version = recorded.get('schema_version', 1)
  if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
    raise ConfigError(
        f'{where} has schema_version={version!r}; this code reads versions 1 to '
        f'{SCHEMA_VERSION}. It was written by a newer version of big_pretrain: run that one.')
  version = max(version, written_by or 1)
  missing = [key for key in expected_keys(recorded, version) if not _has_key(recorded, key)]
  if missing:
    shown = ', '.join(missing[:6]) + (f' and {len(missing) - 6} more' if len(missing) > 6 else '')
    raise DamagedFileError(
        f'{where} lacks keys that every config written by its version (schema_version '
        f'{version}) holds: {shown}. It is damaged (edited, or written over, e.g. by an export '
        'into the stage folder): restore it from a copy of the stage folder, or use a new '
        '--workdir. Nothing was modified.')
  return version


def expected_keys(recorded: Mapping[str, Any], version: int) -> list[str]:
  """The dotted keys a record of `version` must hold (free-form groups as one key)."""
  objective = (recorded.get('objective') or {}).get('name')
  if version < FIRST_WHOLE_VERSION or objective not in objective_names():
    return list(KEYS_OF_EVERY_VERSION)
  added_later = {key for added_in, keys in KEYS_ADDED_IN_VERSION.items() if added_in > version
                 for key in keys}
  return [key for key, _ in stage_keys(objective).walk() if key not in added_later]


def _has_key(recorded: Mapping[str, Any], dotted: str) -> bool:
  node = recorded
  for part in dotted.split('.'):
    if not isinstance(node, Mapping) or part not in node:
      return False
    node = node[part]
  return True
