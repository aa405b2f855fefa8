"""Initializing a stage from an earlier stage's checkpoint (MAE -> WSP), or from public weights.

Only the taken subtrees (e.g. the encoder) are read from disk (Orbax partial
restore); they are converted to the target's layout by the model's own rules
(models/vit.py `fit_layout`: scanned <-> unrolled layers, learned position
embeddings resampled to a new patch grid), checked
against the fresh parameters' shapes (a mismatch names the parameter and both
shapes), and copied bit-exactly. Everything not taken (the WSP head) keeps its
fresh initialization; what is not needed (the MAE decoder) is never read.

init_from.checkpoint may also name public weights (weights/public_checkpoints.py: a timm or
Hugging Face folder or .safetensors file, a MAE reference .pth, a big_vision .npz): they are
read into the same subtrees and placed the same way; a mismatch is named in one line.
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
from big_pretrain.storage import checksums
from big_pretrain.storage.checkpoints import (STATE_ITEM, check_shapes_fit, damaged_array,
                                              recorded_digests, saved_steps, tree_shapes,
                                              unreadable_reason, unverified_warning)
from big_pretrain.storage.stage_dir import StageDir
from big_pretrain.weights import public_checkpoints, weight_files

def resolve_checkpoint_dir(path: str) -> str:
  """A readable step directory from a step dir, a checkpoints dir or a stage workdir: the
  first of `readable_step_dirs`."""
  return readable_step_dirs(path)[0]


def readable_step_dirs(path: str) -> list[str]:
  """The step directories `path` offers, newest first: itself if it is a step dir, else
  the steps of a folder of steps or of a stage workdir that look readable (checked cheaply,
  by their metadata; unreadable ones are skipped with a warning naming the file)."""
  path = storage.absolute(path)
  if storage.is_dir(os.path.join(path, STATE_ITEM)):
    reason = unreadable_reason(path)
    if reason is not None:
      raise CheckpointUnreadableError(
          f'The checkpoint {path} cannot be read: {reason}. Point init_from at another step '
          'folder, or at the folder of steps to take its latest readable one.')
    return [path]
  for candidate in (path, StageDir(path).checkpoints):
    readable, reasons = [], []
    for step in reversed(saved_steps(candidate)):
      step_dir = os.path.join(candidate, str(step))
      reason = unreadable_reason(step_dir)
      if reason is None:
        readable.append(step_dir)
        continue
      logging.warning('Skipping checkpoint step %d in %s: it cannot be read (%s).',
                      step, candidate, reason)
      reasons.append(reason)
    if readable:
      return readable
    if reasons:
      raise CheckpointUnreadableError(
          f'No checkpoint in {candidate} can be read:\n  ' + '\n  '.join(reasons[:5]) +
          '\nIf it is an earlier stage of this config, move these step folders aside and run '
          'the same command: the stage runs again from its start.')
  raise CheckpointUnreadableError(
      f'No checkpoint found at {path}: expected a step folder holding "{STATE_ITEM}/", a '
      "folder of such step folders or a stage's folder, or public weights (a timm or Hugging "
      'Face folder with its model.safetensors, a .safetensors, .pth or .npz file). Point '
      'init_from.checkpoint at one, or init_from.stage at an earlier stage of this config.')


def read_intact_subtrees(path: str, take: tuple[str, ...]) -> tuple[str, dict]:
  """(step dir, `read_subtrees`) of the newest step of `path` whose arrays read back and
  match their digests; a damaged step is skipped with a warning (and left where it is: a
  reader changes nothing in another stage's folder). A step dir given itself is read or
  refused."""
  step_dirs = readable_step_dirs(path)
  skipped = []
  for step_dir in step_dirs:
    try:
      return step_dir, read_subtrees(step_dir, take)
    except CheckpointUnreadableError as error:
      if len(step_dirs) == 1:
        raise
      logging.warning('Skipping checkpoint %s: %s. Trying the previous step.', step_dir, error)
      skipped.append(str(error))
  raise CheckpointUnreadableError(
      f'No checkpoint in {path} is intact ({len(skipped)} damaged; the newest: {skipped[0]}). '
      'If it is an earlier stage of this config, move its step folders aside and run the '
      'same command: the stage runs again from its start.')


def _saved_tree(step_dir: str) -> dict:
  # The handler's metadata: the tree alone (the checkpointer's would also look for step
  # metadata, which lives one folder up, and warn that it is missing).
  return ocp.PyTreeCheckpointHandler().metadata(
      epath.Path(os.path.join(step_dir, STATE_ITEM))).tree


def saved_param_names(step_dir: str) -> list[str]:
  """The top-level subtrees of params in a step's checkpoint ('encoder', 'head', ...)."""
  return sorted(_saved_tree(step_dir).get('params', {}))


def read_subtrees(step_dir: str, take: tuple[str, ...]) -> dict:
  """{name: numpy tree} for each params/<name> in `take`, reading nothing else."""
  checkpointer = ocp.PyTreeCheckpointer()
  state_dir = os.path.join(step_dir, STATE_ITEM)
  metadata = _saved_tree(step_dir)
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
  _verify_digests(step_dir, restored)
  weight_files.check_finite(restored['params'], f'{step_dir} params')
  return restored['params']


def _verify_digests(step_dir: str, restored: dict) -> None:
  """Every array read is checked against the digest its step was saved with."""
  recorded = recorded_digests(step_dir)
  if recorded is None:
    logging.warning('%s', unverified_warning(step_dir))
    return
  digests = {path: checksums.numpy_digest(leaf) for path, leaf in checksums.leaf_paths(restored)}
  problem = damaged_array(step_dir, digests, recorded)
  if problem is not None:
    raise CheckpointUnreadableError(
        f'{problem}. If this is an earlier stage of this config, move {step_dir} aside and '
        'run the same command: the stage resumes from its previous checkpoint and finishes '
        'again.')


def adapt_subtree(source: dict, target: dict, where: str) -> dict:
  """The model's layout conversion (vit.fit_layout), then an exact structure and shape check."""
  adapted = fit_layout(source, target)
  check_shapes_fit(tree_shapes(adapted), tree_shapes(target), where)
  return adapted


def load_into(fresh_params: dict, step_dir: str, take: tuple[str, ...]) -> dict:
  """`fresh_params` with each subtree in `take` replaced by the checkpoint's, same shardings.
  `step_dir`: a step folder, or a folder of steps (the newest intact one is read)."""
  return load_intact_into(fresh_params, step_dir, take)[1]


def load_intact_into(fresh_params: dict, path: str, take: tuple[str, ...]) -> tuple[str, dict]:
  """(the step folder read, `load_into`'s parameters)."""
  _check_takes(fresh_params, take)
  step_dir, subtrees = read_intact_subtrees(path, take)
  adapted = {name: adapt_subtree(subtrees[name], fresh_params[name], f'{step_dir} params/{name}')
             for name in take}
  return step_dir, _placed(fresh_params, adapted, step_dir)


def load_public_into(fresh_params: dict, path: str, take: tuple[str, ...]) -> dict:
  """`fresh_params` with each subtree in `take` from public weights (see the module doc)."""
  _check_takes(fresh_params, take)
  parts = public_checkpoints.read_public_checkpoint(path, fresh_params)
  absent = [name for name in take if name not in parts]
  if absent:
    raise CheckpointMismatchError(
        f'{path} has no {absent[0]!r} to take (it has {sorted(parts)}): fix init_from.take.')
  adapted = {}
  for name in take:
    adapted[name] = fit_layout(parts[name], fresh_params[name])
    _check_fits_in_one_line(adapted[name], fresh_params[name], name, path)
  return _placed(fresh_params, adapted, path)


def load_from(fresh_params: dict, source: str, take: tuple[str, ...]) -> dict:
  """init_from.checkpoint (or an earlier stage's checkpoints) -> load_into or load_public_into."""
  if public_checkpoints.is_public_checkpoint(source):
    return load_public_into(fresh_params, source, take)
  return load_into(fresh_params, source, take)


def _check_takes(fresh_params: dict, take: tuple[str, ...]) -> None:
  for name in take:
    if name not in fresh_params:
      raise CheckpointMismatchError(
          f'init_from.take names {name!r}, which this model does not have; it has '
          f'{sorted(fresh_params)}.')


def _check_fits_in_one_line(adapted: dict, fresh: dict, name: str, path: str) -> None:
  got, want = tree_shapes(adapted), tree_shapes(fresh)
  problems = [f'{name}/{key} is {got[key]} there and {want[key]} here'
              for key in sorted(set(got) & set(want)) if got[key] != want[key]]
  problems += [f'{name}/{key} is missing there' for key in sorted(set(want) - set(got))]
  problems += [f'{name}/{key} has no place here' for key in sorted(set(got) - set(want))]
  if problems:
    more = f' (and {len(problems) - 2} more)' if len(problems) > 2 else ''
    raise CheckpointMismatchError(
        f"{path} does not fit the model of this config: {'; '.join(problems[:2])}{more}. "
        'Match model.variant, use_cls_token and posemb to the checkpoint.')


def _placed(fresh_params: dict, adapted: dict, source: str) -> dict:
  """`fresh_params` with the `adapted` subtrees (numpy) copied in, on the fresh ones'
  shardings."""
  params = dict(fresh_params)
  for name, subtree in adapted.items():
    # Each device takes its own slice of the host copy (safe with several hosts).
    params[name] = jax.tree_util.tree_map(
        lambda value, fresh: jax.make_array_from_callback(
            fresh.shape, fresh.sharding, lambda index, v=np.asarray(value, fresh.dtype): v[index]),
        subtree, fresh_params[name])
    logging.info('Initialized params/%s from %s (%d arrays).', name, source,
                 len(jax.tree_util.tree_leaves(subtree)))
  return params
