"""Initialising a stage from an earlier stage's checkpoint (MAE -> WSP).

Only the taken subtrees (e.g. the encoder) are read from disk (Orbax partial
restore); they are converted to the target's layout (scanned <-> unrolled
layers, learned position embeddings resampled to a new patch grid), checked
against the fresh parameters' shapes (a mismatch names the parameter and both
shapes), and copied bit-exactly. Everything not taken (the WSP head) keeps its
fresh initialisation; what is not needed (the MAE decoder) is never read.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from absl import logging

from big_pretrain.errors import CheckpointMismatchError, CheckpointUnreadableError
from big_pretrain.storage.stage_dir import StageDir
from big_pretrain.storage import files as storage
from big_pretrain.storage.checkpoints import (STATE_ITEM, check_shapes_fit, saved_steps,
                                              tree_shapes, unreadable_reason)

_BLOCK = re.compile(r'^block_(\d+)$')


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


def scanned_to_unrolled(tree: dict) -> dict:
  """{'blocks': leaves with a leading layer axis} -> {'block_0': ..., 'block_1': ...}, recursively."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key == 'blocks':
      depth = jax.tree_util.tree_leaves(value)[0].shape[0]
      for layer in range(depth):
        out[f'block_{layer}'] = jax.tree_util.tree_map(lambda x, i=layer: x[i], value)
    else:
      out[key] = scanned_to_unrolled(value)
  return out


def unrolled_to_scanned(tree: dict) -> dict:
  """The inverse of `scanned_to_unrolled`."""
  if not isinstance(tree, dict):
    return tree
  layers = sorted((int(m.group(1)), k) for k in tree if (m := _BLOCK.match(k)))
  out = {k: unrolled_to_scanned(v) for k, v in tree.items() if not _BLOCK.match(k)}
  if layers:
    if [i for i, _ in layers] != list(range(len(layers))):
      raise CheckpointMismatchError(f'Layers {[k for _, k in layers]} are not 0..N-1.')
    out['blocks'] = jax.tree_util.tree_map(
        lambda *xs: np.stack(xs), *[tree[k] for _, k in layers])
  return out


def _is_scanned(tree) -> bool:
  if not isinstance(tree, dict):
    return False
  return 'blocks' in tree or any(_is_scanned(v) for v in tree.values())


def _is_unrolled(tree) -> bool:
  if not isinstance(tree, dict):
    return False
  return any(_BLOCK.match(k) for k in tree) or any(_is_unrolled(v) for v in tree.values())


def match_layer_layout(source: dict, target_like: dict) -> dict:
  """Converts `source` to the scanned/unrolled layout of `target_like`."""
  if _is_scanned(source) and _is_unrolled(target_like):
    return scanned_to_unrolled(source)
  if _is_unrolled(source) and _is_scanned(target_like):
    return unrolled_to_scanned(source)
  return source


def resample_position_embedding(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """(1, gh*gw, D) learned embedding -> (1, num_tokens, D) by bilinear resizing of the grid.

  A constant embedding stays constant; same size is returned unchanged.
  """
  old_tokens = posemb.shape[1]
  if old_tokens == num_tokens:
    return posemb
  old_grid, new_grid = int(round(np.sqrt(old_tokens))), int(round(np.sqrt(num_tokens)))
  if old_grid ** 2 != old_tokens or new_grid ** 2 != num_tokens:
    raise CheckpointMismatchError(
        f'pos_embedding: cannot resample {old_tokens} tokens to {num_tokens}: '
        'only square patch grids are supported.')
  grid = posemb.reshape(old_grid, old_grid, -1)
  resized = jax.image.resize(grid, (new_grid, new_grid, grid.shape[-1]), method='bilinear')
  logging.info('Resampled pos_embedding from a %dx%d to a %dx%d grid.',
               old_grid, old_grid, new_grid, new_grid)
  return np.asarray(resized, posemb.dtype).reshape(1, num_tokens, -1)


def _resample_position_embeddings(source: dict, target_like: dict) -> dict:
  if not isinstance(source, dict):
    return source
  out = {}
  for key, value in source.items():
    target_value = target_like.get(key) if isinstance(target_like, dict) else None
    if key == 'pos_embedding' and target_value is not None:
      out[key] = resample_position_embedding(value, target_value.shape[1])
    else:
      out[key] = _resample_position_embeddings(value, target_value)
  return out


def adapt_subtree(source: dict, target: dict, where: str) -> dict:
  """Layout conversion + resampling, then an exact structure and shape check."""
  adapted = _resample_position_embeddings(match_layer_layout(source, target), target)
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
    logging.info('Initialised params/%s from %s (%d arrays).', name, step_dir,
                 len(jax.tree_util.tree_leaves(adapted)))
  return params
