"""Initializing a stage from an earlier stage's checkpoint (MAE -> WSP).

Only the taken subtrees (e.g. the encoder) are read from disk (Orbax partial
restore); they are converted to the target's layout by the model's own rules
(models/vit.py `fit_layout`: scanned <-> unrolled layers, learned position
embeddings resampled to a new patch grid), checked
against the fresh parameters' shapes (a mismatch names the parameter and both
shapes), and copied bit-exactly. Everything not taken (the WSP head) keeps its
fresh initialization; what is not needed (the MAE decoder) is never read.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from absl import logging

from big_pretrain.errors import CheckpointMismatchError, CheckpointUnreadableError
from big_pretrain.models.vit import fit_layout
from big_pretrain.storage import files as storage
from big_pretrain.storage.checkpoints import (STATE_ITEM, check_shapes_fit, saved_steps,
                                              tree_shapes, unreadable_reason)
from big_pretrain.storage.stage_dir import StageDir

def resolve_checkpoint_dir(path: str) -> str:
  """A readable step directory from a step dir, a checkpoints dir or a stage workdir.

  Of a folder of steps, the latest readable one (checked cheaply, by its
  metadata); unreadable ones are skipped with a warning naming the file.
  """
  path = storage.absolute(path)
  if storage.is_dir(os.path.join(path, STATE_ITEM)):
    reason = unreadable_reason(path)
    if reason is not None:
      raise CheckpointUnreadableError(
          f'The checkpoint {path} cannot be read: {reason}. Point init_from at another step '
          'folder, or at the folder of steps to take its latest readable one.')
    return path
  for candidate in (path, StageDir(path).checkpoints):
    reasons = []
    for step in reversed(saved_steps(candidate)):
      step_dir = os.path.join(candidate, str(step))
      reason = unreadable_reason(step_dir)
      if reason is None:
        return step_dir
      logging.warning('Skipping checkpoint step %d in %s: it cannot be read (%s).',
                      step, candidate, reason)
      reasons.append(reason)
    if reasons:
      raise CheckpointUnreadableError(
          f'No checkpoint in {candidate} can be read:\n  ' + '\n  '.join(reasons[:5]) +
          '\nIf it is an earlier stage of this config, move these step folders aside and run '
          'the same command: the stage runs again from its start.')
  raise FileNotFoundError(
      f'No checkpoint found at {path}: expected a step folder holding "{STATE_ITEM}/", or a '
      'folder of such step folders. Point init_from.checkpoint at one, or init_from.stage '
      'at an earlier stage of this config.')


def read_subtrees(step_dir: str, take: tuple[str, ...]) -> dict:
  """{name: numpy tree} for each params/<name> in `take`, reading nothing else."""
  checkpointer = ocp.PyTreeCheckpointer()
  state_dir = os.path.join(step_dir, STATE_ITEM)
  # The handler's metadata: the tree alone (the checkpointer's would also look for step
  # metadata, which lives one folder up, and warn that it is missing).
  metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir)).tree
  missing = [name for name in take if name not in metadata.get('params', {})]
  if missing:
    raise CheckpointMismatchError(
        f'The checkpoint {step_dir} has no params/{missing[0]} to take; it holds '
        f'params/{{{", ".join(sorted(metadata.get("params", {})))}}}. Fix init_from.take.')
  wanted = {'params': {name: metadata['params'][name] for name in take}}
  restore_args = jax.tree_util.tree_map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  try:
    restored = checkpointer.restore(
        state_dir, args=ocp.args.PyTreeRestore(
            item=wanted, restore_args=restore_args, partial_restore=True))
  except Exception as error:  # noqa: BLE001  (the tree is there: a failed read is damage)
    raise CheckpointUnreadableError(
        f'The arrays of params/{{{", ".join(take)}}} in {state_dir} do not read back '
        f'({type(error).__name__}: {str(error)[:300]}). If this is an earlier stage of this '
        f'config, move {step_dir} aside and run the same command: the stage resumes from its '
        'previous checkpoint and finishes again.') from error
  return restored['params']


def adapt_subtree(source: dict, target: dict, where: str) -> dict:
  """The model's layout conversion (vit.fit_layout), then an exact structure and shape check."""
  adapted = fit_layout(source, target)
  check_shapes_fit(tree_shapes(adapted), tree_shapes(target), where)
  return adapted


def load_into(fresh_params: dict, step_dir: str, take: tuple[str, ...]) -> dict:
  """`fresh_params` with each subtree in `take` replaced by the checkpoint's, same shardings."""
  subtrees = read_subtrees(step_dir, take)
  params = dict(fresh_params)
  for name in take:
    if name not in fresh_params:
      raise CheckpointMismatchError(
          f'init_from.take names {name!r}, which this model does not have; it has '
          f'{sorted(fresh_params)}.')
    adapted = adapt_subtree(subtrees[name], fresh_params[name], f'{step_dir} params/{name}')
    # Each device takes its own slice of the host copy (safe with several hosts).
    params[name] = jax.tree_util.tree_map(
        lambda value, fresh: jax.make_array_from_callback(
            fresh.shape, fresh.sharding, lambda index, v=np.asarray(value, fresh.dtype): v[index]),
        adapted, fresh_params[name])
    logging.info('Initialized params/%s from %s (%d arrays).', name, step_dir,
                 len(jax.tree_util.tree_leaves(adapted)))
  return params
