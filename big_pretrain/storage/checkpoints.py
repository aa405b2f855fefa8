"""Orbax checkpoints of the train state and the data position, saved together.

Saving the data position beside the model is what makes a resumed run see
exactly the batches it would have seen (the rng needs no saving: it is folded
from the step). The position is global (data/batch_columns.py: one record for every
process, naming the topology that wrote it), so a step resumes on any number of processes
and devices with the same global batch. Saves are asynchronous; a finished stage waits
for them.

Each step also holds the digests of its arrays and data position (storage/checksums.py),
computed where the arrays are when the step is saved; a restore recomputes and compares
them, so bytes altered on disk are found, named, set aside like any unreadable step, and
the previous intact step is restored instead. Deleting or emptying the digests does not
switch the check off: a step whose record is missing or incomplete counts as damaged wherever
the step (its Orbax metadata lists a digests item), the steps beside it or its stage's config
(schema_version 3 on) show that digests were written. Only a step written before digests
existed restores, with one warning that it cannot be verified.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from big_pretrain import schema
from big_pretrain.errors import (CheckpointMismatchError, CheckpointSaveError,
                                 CheckpointUnreadableError, DamagedFileError)
from big_pretrain.storage import checksums
from big_pretrain.storage import files as storage
from big_pretrain.storage.stage_dir import CONFIG_FILE, StageDir

STATE_ITEM = 'state'
# The global data position (data/batch_columns.py), one JSON record for every process.
DATA_POSITION_ITEM = 'data_position'
DATA_POSITION_FILE = 'data_position.json'
# Checkpoints written before global positions hold one Grain state per process here
# (process_<i>-of-<P>.json): they resume, on P processes only.
PER_PROCESS_DATA_ITEM = 'data'

# config.checkpoint: how often a stage saves, and how many saves it keeps.
CHECKPOINT_KEYS = schema.Group(
    "a stage's checkpoints",
    every_steps=schema.Key(1000, schema.COUNT, 'save every this many steps (and the last step)'),
    keep=schema.Key(3, schema.COUNT, 'the latest saves kept; older ones are deleted'),
    async_save=schema.Key(True, schema.BOOLEAN,
                          'write in a background thread while training goes on'),
)


def saved_steps(directory: str) -> list[int]:
  """The step folders in a checkpoint directory, oldest first (in-progress saves excluded)."""
  return sorted(int(name) for name in storage.list_dir(directory) if name.isdigit())


# Orbax's record of a step: among other things, the items it was saved with.
STEP_METADATA_FILE = '_CHECKPOINT_METADATA'
# Every stage config.json of this schema version on was written by code that saves digests
# (config/defaults.py SCHEMA_VERSION; a test keeps the two in step).
DIGESTS_SINCE_SCHEMA_VERSION = 3


def read_digests(step_dir: str) -> dict | None:
  """The digests file of a step as it is ({'arrays': {path: [h1, h2]}, 'data_position':
  sha256}), or None if there is none. `recorded_digests` judges it."""
  path = os.path.join(step_dir, checksums.DIGESTS_ITEM, checksums.DIGESTS_FILE)
  try:
    return storage.read_json(path, if_damaged='The checkpoint cannot be verified without it: '
                             'treat the step as damaged.')
  except DamagedFileError as error:
    raise CheckpointUnreadableError(str(error)) from error


def recorded_digests(step_dir: str) -> dict | None:
  """The digests `step_dir` was saved with, or None for a step written before digests existed.

  A record that is missing where digests were written (`digests_written`), unreadable, or
  holds no array digests raises CheckpointUnreadableError: the step cannot be verified, so
  it counts as damaged. Deleting the record is then no way around the check.
  """
  recorded = read_digests(step_dir)
  path = os.path.join(step_dir, checksums.DIGESTS_ITEM, checksums.DIGESTS_FILE)
  if recorded is None:
    written, evidence = digests_written(step_dir)
    if written:
      raise CheckpointUnreadableError(
          f'{path} is missing, although {evidence}: without it the step cannot be verified, '
          'so it counts as damaged')
    return None
  arrays = recorded.get('arrays')
  if not isinstance(arrays, dict) or not arrays:
    raise CheckpointUnreadableError(
        f'{path} records no array digests: without them the step cannot be verified, so it '
        'counts as damaged')
  return recorded


def digests_written(step_dir: str) -> tuple[bool, str]:
  """Whether the step in `step_dir` was saved with digests, and the evidence, in words.

  The step's own Orbax metadata is the witness where it reads (it lists the items the step
  was saved with); else the steps beside it, and its stage's config.json (written by a
  version that saves digests from schema_version 3 on).
  """
  metadata = _json_or_none(os.path.join(step_dir, STEP_METADATA_FILE))
  handlers = (metadata or {}).get('item_handlers')
  if isinstance(handlers, dict):
    if checksums.DIGESTS_ITEM in handlers:
      return True, f'its {STEP_METADATA_FILE} lists a {checksums.DIGESTS_ITEM!r} item'
    return False, f'its {STEP_METADATA_FILE} lists no {checksums.DIGESTS_ITEM!r} item'
  folder = os.path.dirname(step_dir.rstrip('/'))
  for step in saved_steps(folder):
    sibling = os.path.join(folder, str(step))
    if sibling != step_dir.rstrip('/') and storage.exists(
        os.path.join(sibling, checksums.DIGESTS_ITEM, checksums.DIGESTS_FILE)):
      return True, f'step {step} beside it has digests'
  stage_config = _json_or_none(StageDir(os.path.dirname(folder)).config_file)
  version = (stage_config or {}).get('schema_version')
  if isinstance(version, int) and version >= DIGESTS_SINCE_SCHEMA_VERSION:
    return True, (f"its stage's {CONFIG_FILE} was written by a version that saves digests "
                  f'(schema_version {version})')
  return False, 'nothing beside it shows digests'


def _json_or_none(path: str) -> dict | None:
  """A JSON object file, or None if it is missing or not one (a witness, not a record)."""
  try:
    return storage.read_json(path, if_damaged='')
  except DamagedFileError:
    return None


def damaged_array(step_dir: str, restored: dict[str, list[int]], recorded: dict) -> str | None:
  """Why the `restored` arrays fail the step's `recorded_digests`: the first one whose digest
  differs, or that the record lacks (an incomplete record verifies nothing); None if all pass."""
  arrays = recorded['arrays']
  unrecorded = [path for path in restored if path not in arrays]
  if unrecorded:
    return (f'the digests of {step_dir} have no record of the array {unrecorded[0]}'
            + (f' (nor of {len(unrecorded) - 1} more)' if len(unrecorded) > 1 else '')
            + ': an incomplete record cannot verify the step, so it counts as damaged')
  path = checksums.first_mismatch(restored, arrays)
  if path is None:
    return None
  return (f'the array {path} of {step_dir} does not match the digest it was saved with: its '
          'bytes changed on disk')


def unverified_warning(step_dir: str) -> str:
  """The one warning for a step written before digests existed."""
  return (f'{step_dir} was written without digests, by a version of big_pretrain before them '
          f'({digests_written(step_dir)[1]}): it cannot be verified.')


def unreadable_reason(step_dir: str) -> str | None:
  """Why the checkpoint in `step_dir` cannot be read, naming the file; None if it looks whole.

  Cheap: reads the state's tree metadata (which opens its array store), not
  the arrays, so a damaged array file is found only by restoring it.
  """
  state_dir = epath.Path(step_dir) / STATE_ITEM
  metadata_file = state_dir / '_METADATA'
  if not metadata_file.exists():
    return f'{metadata_file} is missing'
  try:
    ocp.PyTreeCheckpointHandler().metadata(state_dir)
  except Exception as error:  # noqa: BLE001  (any failure to read it means: unreadable)
    return f'the tree metadata in {state_dir} does not read: {type(error).__name__}: ' + (
        str(error)[:300])
  return None


def tree_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'params/encoder/...': shape} for every array-like leaf of `tree`."""
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and not isinstance(x, dict))
  return {
      jax.tree_util.keystr(path, simple=True, separator='/'): tuple(leaf.shape)
      for path, leaf in leaves if hasattr(leaf, 'shape')
  }


def check_shapes_fit(saved: dict, expected: dict, where: str) -> None:
  """Raises CheckpointMismatchError listing missing, unexpected and mis-shaped paths."""
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  mismatched = [
      f'  {path}: checkpoint {saved[path]} vs model {expected[path]}'
      for path in sorted(set(saved) & set(expected)) if saved[path] != expected[path]
  ]
  if not (missing or unexpected or mismatched):
    return
  lines = [f'The checkpoint {where} does not fit the model of this config.']
  if mismatched:
    lines += ['Shapes that differ:'] + mismatched[:20]
  if missing:
    lines += ['In the model but not the checkpoint:'] + [f'  {p}' for p in missing[:20]]
  if unexpected:
    lines += ['In the checkpoint but not the model:'] + [f'  {p}' for p in unexpected[:20]]
  lines.append('If you changed the model or optimizer, start in a new --workdir; nothing '
               'was modified.')
  raise CheckpointMismatchError('\n'.join(lines))


def topology(state) -> dict:
  """{'processes', 'devices', 'mesh'} of the run holding `state` (arrays or ShapeDtypeStructs
  with their shardings)."""
  meshes = [leaf.sharding.mesh for leaf in jax.tree_util.tree_leaves(state)
            if isinstance(getattr(leaf, 'sharding', None), jax.sharding.NamedSharding)]
  mesh = meshes[0] if meshes else None
  return {'processes': jax.process_count(),
          'devices': int(mesh.size) if mesh is not None else jax.device_count(),
          'mesh': {name: int(size) for name, size in mesh.shape.items()} if mesh else {}}


def describe_topology(recorded: dict) -> str:
  """'2 processes x 2 devices' (devices per process)."""
  processes, devices = int(recorded['processes']), int(recorded['devices'])
  per_process = devices // max(processes, 1)
  return (f'{processes} process{"es" if processes != 1 else ""} x {per_process} '
          f'device{"s" if per_process != 1 else ""}')


def topology_change(saved: dict | None, current: dict) -> str | None:
  """'2 processes x 2 devices -> 1 process x 4 devices' (with the meshes where they differ),
  or None when the run resumes where it was saved (or the step does not say)."""
  if not saved or all(saved.get(key) == current[key] for key in ('processes', 'devices',
                                                                  'mesh')):
    return None
  change = f'{describe_topology(saved)} -> {describe_topology(current)}'
  if saved.get('mesh') != current['mesh']:
    def mesh(shape):
      return ', '.join(f'{name}={size}' for name, size in shape.items())
    change += f' (mesh {mesh(saved.get("mesh") or {})} -> {mesh(current["mesh"])})'
  return change


class Checkpointer:
  """The train state and data position of one stage, in `directory`."""

  def __init__(self, directory: str, checkpoint_config):
    self.directory = storage.absolute(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=checkpoint_config.every_steps,
        max_to_keep=checkpoint_config.keep,
        enable_async_checkpointing=checkpoint_config.async_save,
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=(STATE_ITEM, DATA_POSITION_ITEM, PER_PROCESS_DATA_ITEM,
                    checksums.DIGESTS_ITEM),
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                       DATA_POSITION_ITEM: ocp.JsonCheckpointHandler(
                           filename=DATA_POSITION_FILE),
                       # Read by hand (`_per_process_position`); registered so Orbax knows it.
                       PER_PROCESS_DATA_ITEM: grain.checkpoint.CheckpointHandler(),
                       checksums.DIGESTS_ITEM: ocp.JsonCheckpointHandler(
                           filename=checksums.DIGESTS_FILE)})
    self._last_started_step = None  # an asynchronous save's failure shows at the next call
    self._warned_unverified = False
    # Set by a restore: how the run's processes and devices differ from the step's, in words.
    self.topology_change: str | None = None

  def all_steps(self) -> list[int]:
    self._manager.reload()  # Other processes or runs may have written since.
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `step` is on the save interval (or is the first step of a new directory)."""
    return self._manager.should_save(step)

  def save(self, step: int, state, data_position, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it did.

    `data_position`: the input's position (its `global_position()` is gathered from every
    process here, a collective; the record names the topology that wrote it).

    Raises CheckpointSaveError when this save, or an asynchronous one before it,
    fails (a full disk, a lost bucket): training on would only lose more steps.
    """
    if not (force or self._manager.should_save(step)):
      return False
    # The previous asynchronous save finishes first (Orbax's save would wait for it too):
    # its finalizing thread synchronizes the processes, and the digests below gather across
    # them; run at once, two threads' collectives could pair up wrongly across processes.
    self.wait_until_finished()
    self._check_free_space(step, state)
    # Computed on the devices that hold the state (a read of it, no host copy): Orbax then
    # writes the digests with the step, in the same (asynchronous) save.
    position = {**data_position.global_position().to_json(), 'written_by': topology(state)}
    digests = {'arrays': checksums.tree_digests(state),
               checksums.DATA_POSITION_DIGEST_KEY: checksums.json_digest(position)}
    try:
      started = self._manager.save(
          step, force=force,
          args=ocp.args.Composite(**{
              STATE_ITEM: ocp.args.StandardSave(state),
              DATA_POSITION_ITEM: ocp.args.JsonSave(position),
              checksums.DIGESTS_ITEM: ocp.args.JsonSave(digests),
          }))
    except Exception as error:  # noqa: BLE001  (Orbax raises many kinds; all mean: not saved)
      raise self._save_error(step, error) from error
    if started:
      self._last_started_step = step
    return started

  def _check_free_space(self, step: int, state) -> None:
    """Refuses a save that cannot fit on a local disk, before Orbax starts writing.

    A full disk found mid-save fails inside Orbax's writer threads, which print
    their own tracebacks; the state's size (the arrays, uncompressed: an upper
    bound) against the free space says it at once, in one message.
    """
    if storage.is_bucket(self.directory) or not os.path.isdir(self.directory):
      return
    needed = sum(getattr(leaf, 'nbytes', 0) for leaf in jax.tree_util.tree_leaves(state))
    free = shutil.disk_usage(self.directory).free
    if free < needed:
      raise self._save_error(step, OSError(
          errno.ENOSPC, f'No space left on device: the checkpoint needs about '
          f'{needed / 2**20:.1f} MiB and {self.directory} has {free / 2**20:.1f} MiB free'))

  def _save_error(self, step: int | None, error: Exception) -> CheckpointSaveError:
    try:
      self._manager.wait_until_finished()  # an earlier save in flight is then listed
    except Exception:  # noqa: BLE001  (it is named by the error being raised)
      pass
    try:
      kept = self.all_steps()
    except Exception:  # noqa: BLE001  (the folder itself may be what failed)
      kept = []
    if self._last_started_step not in (None, step, *kept):
      # Orbax raises an asynchronous save's error when the next save starts.
      step = self._last_started_step
    return CheckpointSaveError(
        f'Could not save the checkpoint {f"of step {step} " if step is not None else ""}'
        f'in {self.directory} '
        f'({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}): '
        'stopping. The checkpoints written before it '
        + (f'(step{"s" if len(kept) > 1 else ""} {", ".join(map(str, kept))}) '
           if kept else '')
        + 'are intact. Free space or fix the folder, then run the same command to resume.')

  def restore(self, step: int, abstract_state, data_position=None):
    """Restores the state (sharded as `abstract_state`) and, if given, the data position.

    The position is global: a step written by any number of processes resumes on this
    one's (a step written before global positions only on its own process count).
    """
    # Read first what the checkpoint holds: files missing or damaged make it
    # unreadable; a whole checkpoint with another tree or shapes does not fit.
    saved = self._read_state_metadata(step)
    check_shapes_fit(tree_shapes(saved), tree_shapes(abstract_state),
                     f'{self.directory} (step {step})')
    step_dir = self._step_dir(step)
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    per_process = (data_position is not None
                   and not (epath.Path(step_dir) / DATA_POSITION_ITEM).exists()
                   and (epath.Path(step_dir) / PER_PROCESS_DATA_ITEM).exists())
    if data_position is not None and not per_process:
      items[DATA_POSITION_ITEM] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      position = (self._per_process_position(step) if per_process
                  else restored[DATA_POSITION_ITEM] if data_position is not None else None)
    except CheckpointMismatchError:
      raise
    except Exception as error:  # noqa: BLE001  (the tree fits: a failed read is damage)
      raise CheckpointUnreadableError(
          f'its arrays or data position in {step_dir} do not read back: '
          f'{type(error).__name__}: {str(error)[:500]}') from error
    self._verify(step, restored[STATE_ITEM], position, per_process)
    if data_position is not None:
      self._restore_position(step, data_position, position, abstract_state, per_process)
    logging.info('Restored step %d from %s', step, self.directory)
    return restored[STATE_ITEM]

  def _restore_position(self, step: int, data_position, position, abstract_state,
                        per_process: bool) -> None:
    """Continues the input from the step's position; logs a change of topology."""
    if per_process:
      data_position.set_state(json.loads(position))
      self.topology_change = None
      return
    try:
      data_position.set_state(position)
    except CheckpointMismatchError:
      raise
    except (KeyError, TypeError, ValueError) as error:  # digests passed: written so, or old
      raise CheckpointUnreadableError(
          f'the data position of {self._step_dir(step)} does not read: {error}') from error
    self.topology_change = topology_change(position.get('written_by'),
                                           topology(abstract_state))
    if self.topology_change:
      logging.info('Resuming step %d on another topology: %s. The data position is global: '
                   'the run continues with the same global batches.', step,
                   self.topology_change)

  def _verify(self, step: int, state, position, per_process: bool) -> None:
    """CheckpointUnreadableError naming the first array (or the data position) whose digest
    differs from the one the step was saved with; every process reaches the same verdict."""
    step_dir = self._step_dir(step)
    recorded = recorded_digests(step_dir)
    if recorded is None:
      if not self._warned_unverified:
        logging.warning('%s Saves from now on can be.', unverified_warning(step_dir))
        self._warned_unverified = True
      return
    problem = damaged_array(step_dir, checksums.tree_digests(state), recorded)  # same everywhere
    if problem is None and position is not None and not per_process:
      if recorded.get(checksums.DATA_POSITION_DIGEST_KEY) != checksums.json_digest(position):
        problem = (f'the data position of {step_dir} does not match the digest it was saved '
                   'with, or it has no digest there')
    elif problem is None and position is not None:
      saved = (recorded.get(checksums.PER_PROCESS_DATA_DIGEST_KEY) or {}).get(
          str(jax.process_index()))
      damaged_here = saved != checksums.bytes_digest(position.encode())
      if np.any(multihost_utils.process_allgather(np.array([damaged_here]))):
        problem = (f'the data position of {step_dir} (process '
                   f'{jax.process_index()} or another) does not match the digest it was '
                   'saved with, or it has no digest there')
    if problem is not None:
      raise CheckpointUnreadableError(problem)

  def restore_latest_readable(self, abstract_state, data_position=None):
    """(step, state) of the newest checkpoint that reads back whole, or None if there is none.

    A checkpoint that fails to read (its metadata or an array file missing,
    truncated or damaged, e.g. by a machine that died mid-copy) is reported,
    moved to `corrupt_checkpoints/` beside the checkpoint folder (never
    deleted), and the previous one is tried. A checkpoint that reads but does
    not fit this config is not damage: that CheckpointMismatchError is raised.
    """
    set_aside = []
    for step in reversed(self.all_steps()):
      try:
        return step, self.restore(step, abstract_state, data_position)
      except CheckpointUnreadableError as error:
        moved_to = self._set_aside(step)
        set_aside.append(step)
        logging.warning(
            'Checkpoint step %d in %s cannot be read: %s. Moved it to %s and trying the '
            'previous checkpoint.', step, self.directory, error, moved_to)
    if set_aside:
      raise CheckpointUnreadableError(
          f'No checkpoint in {self.directory} is intact: step{"s" if len(set_aside) > 1 else ""} '
          f'{", ".join(map(str, sorted(set_aside)))} did not read back whole and '
          f'{"were" if len(set_aside) > 1 else "was"} moved to '
          f'{os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")} (the log '
          'says why). Run the same command to start the stage again from step 0, or put back '
          'a copy of an intact checkpoint.')
    return None

  def unreadable_reason(self, step: int) -> str | None:
    """`unreadable_reason` of this directory's `step` (cheap: metadata, not arrays)."""
    return unreadable_reason(self._step_dir(step))

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _read_state_metadata(self, step: int):
    """The saved state's tree metadata; CheckpointUnreadableError naming the file if it is not there."""
    reason = unreadable_reason(self._step_dir(step))
    if reason is not None:
      raise CheckpointUnreadableError(reason)
    return self._manager.item_metadata(step)[STATE_ITEM]

  def _set_aside(self, step: int) -> str:
    """Moves step's folder to corrupt_checkpoints/ (process 0; the others wait)."""
    source = epath.Path(self.directory) / str(step)
    target = epath.Path(self.directory).parent / 'corrupt_checkpoints' / f'{step}-{int(time.time())}'
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      source.rename(target)
    multihost_utils.sync_global_devices(f'big_pretrain_set_aside_{step}')
    self._manager.reload()
    return str(target)

  def _per_process_position(self, step: int) -> str:
    """This process's position text in a step written before global positions; such a step
    resumes only on the process count that wrote it (CheckpointMismatchError otherwise)."""
    folder = epath.Path(self._step_dir(step)) / PER_PROCESS_DATA_ITEM
    saved_counts = {int(match.group(1)) for path in folder.glob('process_*-of-*')
                    if (match := re.search(r'-of-(\d+)', path.name))}
    here = jax.process_count()
    if saved_counts and saved_counts != {here}:
      saved = max(saved_counts)
      def processes(n):
        return f'{n} process' + ('es' if n != 1 else '')
      raise CheckpointMismatchError(
          f'The checkpoint {self.directory} (step {step}) was written by {processes(saved)} '
          'with a version of big_pretrain that saved each process\'s data position on its '
          f'own, so it resumes only on {processes(saved)} (this run has {processes(here)}): '
          f'run with {processes(saved)}, or start a new --workdir with '
          f'config.init_from.checkpoint={self.directory!r}. Nothing was modified.')
    return (folder / f'process_{jax.process_index()}-of-{here}.json').read_text()

  def wait_until_finished(self) -> None:
    """Waits for an asynchronous save; raises CheckpointSaveError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001
      raise self._save_error(None, error) from error

  def close(self) -> None:
    """Closes the manager; an asynchronous save's failure it raises again (a full disk
    while Orbax wrote the step's metadata) is a CheckpointSaveError, as on every wait."""
    try:
      self._manager.close()
    except Exception as error:  # noqa: BLE001  (Orbax raises many kinds; all mean: not saved)
      raise self._save_error(None, error) from error
