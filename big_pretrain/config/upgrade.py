"""Configs that an earlier version of the code recorded, brought to today's schema.

A stage records its config in its folder (storage/stage_dir.py: config.json), and
other stages read it back (a pseudo-label job reads its teacher's). Every config
carries `schema_version`; one recorded before the key existed is version 1.
`upgrade` turns a recorded config of any version into a complete one of
SCHEMA_VERSION: today's defaults for its objective, overlaid with what was
recorded, and for each key added since, the value that reproduces what the code
did without it. So the code reads every key directly: no `.get(key, fallback)`
standing in for the schema's history.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
from absl import logging

from big_pretrain.config.defaults import SCHEMA_VERSION, stage_config
from big_pretrain.objectives import objective_names
from big_pretrain.errors import ConfigError

# The keys whose default changed when they were added: what a config recorded without them
# meant. (Every other key added to the schema defaults to what its absence meant.)
_MEANING_OF_ABSENT_KEYS_IN_VERSION_1 = {
    'model.scan': False,                   # layers were unrolled unless asked
    'model.attention_impl': 'xla',         # XLA's attention before the cuDNN choice
    'data.decode_at_crop_scale': False,    # JPEGs were decoded whole
}


def upgrade(recorded: Mapping[str, Any], where: str) -> ml_collections.ConfigDict:
  """A recorded training stage's config (a dict from JSON) as a complete config of
  SCHEMA_VERSION. `where` names the file, for errors. Keys the schema no longer has are
  dropped, and logged."""
  version = recorded.get('schema_version', 1)
  if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
    raise ConfigError(
        f'{where} has schema_version={version!r}; this code reads versions 1 to '
        f'{SCHEMA_VERSION}. It was written by a newer version of big_pretrain: run that one.')
  objective = (recorded.get('objective') or {}).get('name')
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
