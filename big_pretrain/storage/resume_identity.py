"""A run's identity, checked when it resumes: the config its checkpoints were trained with.

Each stage records its config in `<workdir>/config.json` (the current one) and
appends a line per start to `config_history.jsonl` (the step it started at and
what changed). On resume the new config is compared with the recorded one
before anything is overwritten:

- a change to a key in CHANGES_ALLOWED_ON_RESUME (logging, evaluators,
  checkpoint cadence, the schedule's length, the device layout, ...) is
  allowed and logged;
- a change to any other key (model, objective, optimizer, batch size, seeds,
  data) would make the saved state mean something else: the run is refused
  with a diff, unless `config.resume_with_changes=True` says it is deliberate.

Keys only one of the two configs has (added to or removed from the schema by
another version of the code) are not changes the user made: they are logged,
not refused. That a record holds every key the version which wrote it had (the record's
schema_version, or its history's, says which) is checked before a stage starts
(stages/trained_stage.py check_recorded_config): a record that lost its model or seed would
otherwise resume with any.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import logging

from big_pretrain.errors import ConfigError
from big_pretrain.storage import files as storage
from big_pretrain.storage.stage_dir import CONFIG_FILE, HISTORY_FILE, StageDir

# The one list of keys (a key or a group of keys) that may change between a
# run's starts without changing what its checkpoints mean; why, beside each.
CHANGES_ALLOWED_ON_RESUME = {
    'total_steps': "the schedule's length (a longer or shorter run)",
    'log': 'logging cadence',
    'evals': 'evaluators only read the parameters',
    'checkpoint': 'checkpoint cadence and how many are kept',
    'init_from': 'read only when a stage starts without a checkpoint',
    'mesh': 'the device layout: the checkpoint is resharded when restored',
    'sharding_rules': 'the device layout, as mesh',
    'model.remat': 'what is recomputed in the backward pass: the same math',
    'model.attention_impl': 'the attention kernel: the same math',
    'model.patch_embed_impl': 'how patches are embedded: the same math',
    'optim.skip_nonfinite_updates': 'how a NaN step is handled, not what is trained',
    'data.num_threads': 'input speed',
    'data.prefetch_buffer_size': 'input speed',
    'data.device_prefetch': 'input speed',
    'data.test_path': 'the held-out split evaluators read',
    'data.tfds_test_split': 'the held-out split evaluators read',
    'data.eval_crop_fraction': 'the held-out split evaluators read',
    'resume_with_changes': 'this permission itself',
    'schema_version': 'the version of the code that wrote the record (config/upgrade.py)',
}
_ABSENT = '(absent)'
_MAX_DIFF_LINES = 12


@dataclasses.dataclass(frozen=True)
class ConfigChanges:
  """How a new config differs from the recorded one: {dotted key: (old, new)} in two parts."""
  allowed: dict      # keys of CHANGES_ALLOWED_ON_RESUME, and keys one side lacks
  identity: dict     # keys that change what the saved state means

  def all(self) -> dict:
    return {**self.identity, **self.allowed}


def compare_configs(recorded: dict, new: dict) -> ConfigChanges:
  """The differences between two configs as JSON objects, split by whether they are allowed."""
  old_flat, new_flat = _flatten(recorded), _flatten(new)
  allowed, identity = {}, {}
  for key in sorted(old_flat.keys() | new_flat.keys()):
    old, value = old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
    if old == value:
      continue
    # A key only one side has comes from another version of the schema, not from the user.
    is_allowed = _allowed_on_resume(key) or _ABSENT in (old, value)
    (allowed if is_allowed else identity)[key] = (old, value)
  return ConfigChanges(allowed, identity)


def check_resume(config, workdir: str, checkpoint_steps: list[int], *,
                 finished: bool = False) -> ConfigChanges | None:
  """Compares `config` with the one recorded in `workdir`; raises ConfigError on a refused change.

  Returns the changes (None when there is no checkpoint to resume or no
  record to compare with). Writes nothing: `record_start` does, once the run
  is known to go ahead. `finished`: the stage in `workdir` is finished and would be
  skipped, which is refused just the same for another run's config (its results would
  pass for this config's).
  """
  recorded = _read_record(workdir)
  if not checkpoint_steps:
    if recorded is not None or _has_event_files(workdir):
      logging.warning(
          'The workdir %s holds the config or logs of an earlier start, but no checkpoint: '
          'if it saved any, they are gone (deleted, or set aside in corrupt_checkpoints/). '
          'Starting at step 0.', workdir)
    return None
  if recorded is None:
    return None  # Checkpoints written before configs were recorded: nothing to compare.
  changes = compare_configs(recorded, _as_json(config))
  if changes.identity and not config.resume_with_changes:
    raise ConfigError(_refusal(changes, workdir, max(checkpoint_steps), finished))
  doing = 'Skipping the finished stage' if finished else 'Resuming'
  if changes.identity:
    logging.warning('%s %s with changes that config.resume_with_changes=True allows:\n%s',
                    doing, workdir, _diff_lines(changes.identity))
  if changes.allowed:
    logging.info('%s with changed keys:\n%s', doing, _diff_lines(changes.allowed))
  return changes


def with_recorded_layout(config, asked_auto: bool, workdir: str, checkpoint_steps: list[int]):
  """`config` with model.scan as the stage's checkpoints hold it. A stage that asked for
  scan='auto' chose its layout when it started (by memory, where the device says how much it
  has: train/remat_choice.py) and recorded it: once it has checkpoints, that layout it is,
  whatever the depth rule resolved 'auto' to now."""
  if not asked_auto or not checkpoint_steps:
    return config
  recorded = _read_record(workdir)
  scan = (recorded or {}).get('model', {}).get('scan')
  if not isinstance(scan, bool) or scan == config.model.scan:
    return config
  config = config.copy_and_resolve_references()
  with config.ignore_type():
    config.model.scan = scan
  return config


def _read_record(workdir: str) -> dict | None:
  """The recorded config.json; a damaged one is refused, since nothing could be compared."""
  return storage.read_json(StageDir(workdir).config_file, if_damaged=IF_RECORD_DAMAGED.format(
      workdir=workdir))


# What to do about a damaged config.json of a stage that has checkpoints.
IF_RECORD_DAMAGED = (
    'It records the config the checkpoints in {workdir} were trained with, so this run cannot '
    'be checked against it. Restore it, or move it away to resume without the check, or use a '
    'new --workdir. Nothing was modified.')


def history_schema_version(workdir: str) -> int | None:
  """The newest schema version config_history.jsonl says started the stage (its entries
  record it from version 3 on), or None; a history that does not read says nothing."""
  text = storage.read_text(StageDir(workdir).history_file) or ''
  versions = []
  for line in text.splitlines():
    try:
      entry = json.loads(line)
    except ValueError:
      return None  # record_start sets a damaged history aside
    if isinstance(entry, dict) and isinstance(entry.get('schema_version'), int):
      versions.append(entry['schema_version'])
  return max(versions, default=None)


def record_start(config, workdir: str, step: int, changes: ConfigChanges | None, *,
                 topology: dict | None = None, topology_change: str | None = None) -> None:
  """Writes config.json (now the current config) and appends this start to the history:
  its step, config changes, the processes and devices it runs on (`topology`) and, for a
  resume on others than the checkpoint's, the change in words."""
  stage_dir = StageDir(workdir)
  history_path = stage_dir.history_file
  entry = {'step': step, 'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
           'schema_version': config.schema_version,
           'changes': {key: list(pair) for key, pair in (changes.all() if changes else {}).items()}}
  if topology is not None:
    entry['topology'] = topology
  if topology_change is not None:
    entry['topology_change'] = topology_change
  previous = _readable_history(history_path)
  # The history first, so a kill in between never leaves a config.json it does not explain.
  storage.write_text(history_path, previous + json.dumps(entry) + '\n')
  storage.write_text(stage_dir.config_file, config.to_json_best_effort(indent=2))


def _readable_history(path: str) -> str:
  """config_history.jsonl's lines so far; a damaged file (a line that is not JSON) is set
  aside with a warning, and a new history starts."""
  text = storage.read_text(path) or ''
  try:
    for line in text.splitlines():
      json.loads(line)
  except ValueError as error:  # record_start runs on process 0 only: it alone renames
    kept = storage.set_aside(path)
    logging.warning('%s cannot be read (%s); set aside as %s, and a new history starts with '
                    'this run.', path, error, os.path.basename(kept))
    return ''
  return text


def _refusal(changes: ConfigChanges, workdir: str, latest_step: int, finished: bool) -> str:
  what_follows = (
      'That run is finished: skipping it would report its results as this config\'s. To train '
      'this config, use a new --workdir. To skip it anyway, add '
      '--config.resume_with_changes=True.' if finished else
      'Resuming would make one run out of two configs. To start a separate run, use a new '
      '--workdir. To resume with these changes on purpose (they are recorded in '
      f'{HISTORY_FILE}), add --config.resume_with_changes=True.')
  return (
      f'This config differs from the one the checkpoints in {workdir} were trained with '
      f'(up to step {latest_step}; recorded in {CONFIG_FILE}) in keys that change what the '
      f'saved state means:\n{_diff_lines(changes.identity)}\n{what_follows} Nothing was '
      'modified.')


def _diff_lines(changes: dict) -> str:
  lines = [f'  {key}: {_short(old)} -> {_short(new)}' for key, (old, new) in changes.items()]
  if len(lines) > _MAX_DIFF_LINES:
    lines = lines[:_MAX_DIFF_LINES] + [f'  ... and {len(lines) - _MAX_DIFF_LINES} more']
  return '\n'.join(lines)


def _short(value) -> str:
  text = value if value == _ABSENT else json.dumps(value)
  return text if len(text) <= 60 else text[:57] + '...'


def _allowed_on_resume(key: str) -> bool:
  return any(key == allowed or key.startswith(allowed + '.')
             for allowed in CHANGES_ALLOWED_ON_RESUME)


def _as_json(config) -> dict:
  """The config as config.json holds it (tuples as lists, placeholders as null)."""
  return json.loads(config.to_json_best_effort())


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _has_event_files(workdir: str) -> bool:
  return any('tfevents' in name for name in storage.list_dir(workdir))
