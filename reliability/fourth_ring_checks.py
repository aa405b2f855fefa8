"""The fourth ring's checks of reliability/bad_inputs.py: integrity that deleting a record does
not switch off, a stage's config record that lost keys, exports that must not overwrite a run,
foreign weight files given to init_from.checkpoint, and the bad inputs of every other command
(the export, --compile_for, the converter, the vocabulary builder).

A refusal must be one line of the command's own (`big_pretrain.export: ...`), with the exit
code of its kind, found before anything compiles where it can be, with nothing changed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Callable

import numpy as np

from big_pretrain.errors import EXIT_USAGE
from reliability.bad_input_checks import (
    BASE_TOTAL_STEPS, CARRY_ON, EXIT_OK, REFUSE, Context, Observed, changes_between,
    checkpoint_steps, cut_in_half, on_a_read_only_mount, unreadable_checkpoint)
from reliability.damaged_file_checks import fingerprint_tree, flip_a_bit_that_still_decodes

EXPORT = 'big_pretrain.export'
CONVERT = 'big_pretrain.data.convert'
VOCABULARY = 'big_pretrain.data.text.build_vocabulary'
# Logged once the train step is built (compiled): a refusal of an input that can be checked
# before must come before it.
COMPILED_MARK = 'Model FLOPs per step'
# The shared exports of the trained tiny MAE (bad_inputs.train_fixture): its timm and Hugging
# Face folders.
TIMM_EXPORT, HF_EXPORT = 'timm_export', 'hf_export'
WEIGHTS_FILE = 'model.safetensors'


# --- Integrity: a digests record deleted, emptied or incomplete is damage.


def digests_damaged(how: str) -> Callable[[str], None]:
  """The damage for `unreadable_checkpoint`: one bit of the step's arrays flipped where it
  still decodes, and its digests record deleted or emptied; or (`how` 'missing an array')
  the record of one array removed, nothing flipped: a record that cannot vouch for an array."""

  def damage(checkpoint: str) -> None:
    record_file = os.path.join(checkpoint, 'digests', 'digests.json')
    if how == 'missing an array':
      with open(record_file, encoding='utf-8') as f:
        record = json.load(f)
      del record['arrays'][sorted(record['arrays'])[0]]
      _write_json(record_file, record)
      return
    flip_a_bit_that_still_decodes(checkpoint)
    if how == 'deleted':
      shutil.rmtree(os.path.dirname(record_file))
    else:
      _write_json(record_file, {})

  return damage


def digests_resume_check(how: str) -> Callable[[Context], Observed]:
  return lambda ctx: unreadable_checkpoint(ctx, digests_damaged(how), 'counts as damaged')


def init_from_a_damaged_step(ctx: Context) -> Observed:
  """The chain's finished MAE stage with a bit flipped in its final step and that step's
  digests deleted, WSP not started: WSP takes MAE's previous intact step, and moves nothing."""
  workdir = ctx.trained_copy('chain')
  shutil.rmtree(os.path.join(workdir, 'wsp'))
  final = os.path.join(workdir, 'mae', 'checkpoints', str(BASE_TOTAL_STEPS))
  digests_damaged('deleted')(final)
  run = ctx.main(ctx.tiny('chain'), f'--workdir={workdir}')
  observed = Observed(run, CARRY_ON, (EXIT_OK,), 'Skipping checkpoint .*counts as damaged')
  if not os.path.isdir(final):
    observed.lost.append('the damaged step was moved by a reader')
  if checkpoint_steps(os.path.join(workdir, 'wsp', 'checkpoints'))[-1:] != [BASE_TOTAL_STEPS]:
    observed.problems.append('WSP did not finish')
  return observed


def export_skips_a_damaged_step(ctx: Context) -> Observed:
  workdir = ctx.trained_copy()
  digests_damaged('emptied')(os.path.join(workdir, 'checkpoints', str(BASE_TOTAL_STEPS)))
  run = ctx.command(EXPORT, workdir, '--format=timm',
                    f'--output={os.path.join(ctx.folder, "exported")}')
  observed = Observed(run, CARRY_ON, (EXIT_OK,), 'Skipping checkpoint .*counts as damaged',
                      program=EXPORT)
  if 'checkpoints/2.' not in run.output:
    observed.problems.append('not exported from the previous intact step, 2')
  return observed


# --- A stage's config record that lost keys.


def config_json_edited(edit: Callable[[dict], dict]) -> Callable[[str], None]:
  """A damage for `refused_unchanged`: the workdir's config.json replaced by `edit` of it."""

  def damage(workdir: str) -> None:
    path = os.path.join(workdir, 'config.json')
    with open(path, encoding='utf-8') as f:
      recorded = json.load(f)
    _write_json(path, edit(recorded))

  return damage


def without(key: str) -> Callable[[dict], dict]:
  return lambda recorded: {name: value for name, value in recorded.items() if name != key}


def timm_config(recorded: dict) -> dict:
  """The config.json an export into the stage folder would have written over it."""
  del recorded
  return {'architecture': 'vit_base_patch16_224', 'num_classes': 0,
          'model_args': {'img_size': 32, 'patch_size': 8, 'embed_dim': 64}}


# --- Exports that must not overwrite a run or another export.


def export_refused(ctx: Context, output: Callable[[Context, str], str], *args: str,
                   evidence: str, base: str = 'trained', fmt: str = 'hf') -> Observed:
  """An export of a copy of a shared workdir into `output(ctx, workdir)`, refused in one line
  (exit 2) with the workdir and the output unchanged."""
  workdir = ctx.trained_copy(base)
  stage = workdir if base == 'trained' else os.path.join(workdir, 'mae')
  target = output(ctx, workdir)
  watched = [workdir] + ([target] if os.path.isdir(target) else [])
  before = {folder: fingerprint_tree(folder) for folder in watched}
  run = ctx.command(EXPORT, stage, f'--format={fmt}', f'--output={target}', *args)
  lost = [change for folder in watched
          for change in changes_between(before[folder], fingerprint_tree(folder))]
  return Observed(run, REFUSE, (EXIT_USAGE,), evidence, lost=lost, program=EXPORT)


def a_timm_export(ctx: Context, workdir: str) -> str:
  """A folder holding a timm export of the stage (made by the export, exit 0)."""
  folder = os.path.join(ctx.folder, 'exported')
  run = ctx.command(EXPORT, workdir, '--format=timm', f'--output={folder}')
  if run.rc != EXIT_OK:
    raise RuntimeError(f'the timm export to start from failed: {run.output[-500:]}')
  return folder


def export_overwrites_the_other_format(ctx: Context) -> Observed:
  workdir = ctx.trained_copy()
  folder = a_timm_export(ctx, workdir)
  run = ctx.command(EXPORT, workdir, '--format=hf', f'--output={folder}', '--overwrite')
  observed = Observed(run, CARRY_ON, (EXIT_OK,), r'Wrote .*\(hf\)', program=EXPORT)
  left = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  if left != ['config.json', 'model.safetensors', 'preprocessor_config.json']:
    observed.problems.append(f'the folder holds {left}')
  else:
    with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
      if 'model_type' not in json.load(f):
        observed.problems.append("config.json is not the Hugging Face one")
  return observed


def export_to_read_only(ctx: Context) -> Observed:
  return on_a_read_only_mount(ctx, lambda mount_point: export_refused(
      ctx, lambda ctx, workdir: os.path.join(mount_point, 'exported'), evidence='not writable'))


def export_command(ctx: Context, *args: str, evidence: str) -> Observed:
  """The export of a copy of the trained stage with `args` (a bad flag): one line, exit 2."""
  workdir = ctx.trained_copy()
  run = ctx.command(EXPORT, workdir, f'--output={os.path.join(ctx.folder, "exported")}', *args)
  observed = Observed(run, REFUSE, (EXIT_USAGE,), evidence, program=EXPORT)
  if os.path.exists(os.path.join(ctx.folder, 'exported')):
    observed.problems.append('the output was written')
  return observed


# --- Foreign weight files given to init_from.checkpoint.


def init_from_run(ctx: Context, make: Callable[[Context], str], *args: str, expect: str,
                  exit_codes, evidence: str, before_workdir: bool = False) -> Observed:
  """A new run of the tiny MAE that starts its encoder from `make(ctx)` (a path): refused
  before the step compiles (and, `before_workdir`, before the workdir is made), or trained."""
  path = make(ctx)
  run = ctx.main(ctx.tiny(), ctx.fresh(), f'--config.init_from.checkpoint={path}', *args)
  observed = Observed(run, expect, exit_codes, evidence)
  if expect == REFUSE:
    if COMPILED_MARK in run.output:
      observed.problems.append('refused only after the step compiled')
    fresh = os.path.join(ctx.folder, 'fresh')
    if before_workdir and os.path.exists(fresh):
      observed.problems.append('the workdir was made')
    if checkpoint_steps(os.path.join(fresh, 'checkpoints')):
      observed.lost.append('checkpoints were written')
  elif checkpoint_steps(os.path.join(ctx.folder, 'fresh', 'checkpoints'))[-1:] != [6]:
    observed.problems.append('no final checkpoint')
  return observed


def copied_export(kind: str, edit: Callable[[str], str | None] = lambda folder: None
                  ) -> Callable[[Context], str]:
  """A copy of the shared `kind` export in the case's folder, changed by `edit(folder)` (which
  may return another path to give, e.g. a file in it)."""

  def make(ctx: Context) -> str:
    folder = os.path.join(ctx.folder, kind)
    shutil.copytree(ctx.fixture(kind), folder)
    return edit(folder) or folder

  return make


def without_config_json(folder: str) -> None:
  os.remove(os.path.join(folder, 'config.json'))


def cut_weights(folder: str) -> str:
  weights = os.path.join(folder, WEIGHTS_FILE)
  cut_in_half(weights)
  return weights


def renamed(name: str) -> Callable[[str], str]:
  """The export's weights renamed to `name` (say, a safetensors file named .pth)."""

  def edit(folder: str) -> str:
    target = os.path.join(folder, name)
    os.rename(os.path.join(folder, WEIGHTS_FILE), target)
    return target

  return edit


def _tensors(folder: str) -> dict[str, np.ndarray]:
  from safetensors import numpy as safetensors_numpy  # pylint: disable=import-outside-toplevel
  with open(os.path.join(folder, WEIGHTS_FILE), 'rb') as f:
    return dict(safetensors_numpy.load(f.read()))


def npz_named_safetensors(folder: str) -> str:
  path = os.path.join(folder, 'weights.safetensors')
  with open(path, 'wb') as f:
    np.savez(f, **_tensors(folder))
  return path


def html_named_pth(folder: str) -> str:
  path = os.path.join(folder, 'weights.pth')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('<!DOCTYPE html>\n<html><body>Sign in to download this file</body></html>\n')
  return path


def with_a_nan(folder: str) -> str:
  """The export's weights with one NaN in the patch embedding."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=import-outside-toplevel
  tensors = _tensors(folder)
  tensors['patch_embed.proj.weight'].reshape(-1)[7] = np.nan
  path = os.path.join(folder, 'with_nan.safetensors')
  with open(path, 'wb') as f:
    f.write(safetensors_numpy.save(tensors))
  return path


def in_bfloat16(folder: str) -> str:
  """The export's weights in bfloat16 (rounded to nearest, as torch's .bfloat16() does),
  written in the safetensors layout by hand: the library's numpy writer has no bfloat16."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  tensors = _tensors(folder)
  header, blobs, offset = {}, [], 0
  for name in sorted(tensors):
    bits = tensors[name].astype(ml_dtypes.bfloat16).view('<u2')
    header[name] = {'dtype': 'BF16', 'shape': list(bits.shape),
                    'data_offsets': [offset, offset + bits.nbytes]}
    blobs.append(bits.tobytes())
    offset += bits.nbytes
  encoded = json.dumps(header).encode()
  encoded += b' ' * (-len(encoded) % 8)  # the format pads its header to 8 bytes
  path = os.path.join(folder, 'bf16.safetensors')
  with open(path, 'wb') as f:
    f.write(len(encoded).to_bytes(8, 'little') + encoded + b''.join(blobs))
  return path


def pth_with_args(folder: str) -> str:
  """The MAE reference's checkpoint layout: {'model': tensors, 'args': argparse.Namespace}."""
  import torch  # pylint: disable=import-outside-toplevel
  state = {name: torch.from_numpy(value) for name, value in _tensors(folder).items()}
  path = os.path.join(folder, 'checkpoint.pth')
  torch.save({'model': state, 'epoch': 3, 'args': argparse.Namespace(lr=1e-3)}, path)
  return path


def needs_torch(check: Callable[[Context], Observed]) -> Callable[[Context], Observed]:
  def checked(ctx: Context) -> Observed:
    try:
      import torch  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      return Observed(None, REFUSE, (EXIT_USAGE,), not_run='torch is not installed')
    return check(ctx)
  return checked


# --- main.py --compile_for, the converter and the vocabulary builder.


def compile_for_refused(ctx: Context, *args: str, evidence: str) -> Observed:
  run = ctx.main(ctx.tiny(), *args)
  observed = Observed(run, REFUSE, (EXIT_USAGE,), evidence)
  if 'Compiled for' in run.output:
    observed.problems.append('refused only after compiling')
  return observed


def command_refused(program: str, *args: str, evidence: str,
                    output: str = '') -> Callable[[Context], Observed]:
  """`program` with `args` ('{fixtures}' and '{folder}' filled in): one line, exit 2, and
  `output` (a path under the case's folder) not written."""

  def check(ctx: Context) -> Observed:
    filled = [arg.format(fixtures=ctx.fixtures, folder=ctx.folder) for arg in args]
    target = output.format(fixtures=ctx.fixtures, folder=ctx.folder)
    before = fingerprint_tree(ctx.fixtures)
    run = ctx.command(program, *filled)
    observed = Observed(run, REFUSE, (EXIT_USAGE,), evidence, program=program,
                        lost=changes_between(before, fingerprint_tree(ctx.fixtures)))
    if target and os.path.isdir(target) and os.listdir(target):
      observed.problems.append(f'{target} was written')
    return observed

  return check


def _write_json(path: str, value) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(value, f)

