"""Export a trained stage's weights for timm or Hugging Face transformers.

  python -m big_pretrain.export WORKDIR/STAGE --format=timm --output=DIR [--step=N]
  python -m big_pretrain.export WORKDIR/STAGE --format=hf --output=DIR [--encoder_only]
      [--overwrite] [--verbose]

Reads the stage's Orbax checkpoint (its latest readable step, or --step) and the config
it recorded, and writes DIR in the format --format names: any writable one of the weight
formats' table (FORMATS, big_pretrain/weights/__init__.py), whose module says what it
writes (timm: weights/timm_format.py, a VisionTransformer; hf: weights/hf_format.py,
ViTMAEForPreTraining, ViTForImageClassification or ViTModel). Both write model.safetensors
and config.json (+ preprocessor_config.json for hf), model.safetensors' metadata recording
that big_pretrain wrote it, in which format. --encoder_only leaves the stage's classifier head
and MAE decoder behind.

DIR is written whole: a local one into a hidden folder beside it (.<name>.export-tmp-<pid>),
renamed into place once every file is written, so a kill mid-export leaves the previous
export or the new one, never a mix (between the two renames that swap them, the previous one
is beside DIR as .<name>.export-old-<pid>), and a failed export leaves nothing. A bucket
(gs://...) has no rename of a folder: there each file is written whole, one after the
other, and a kill may leave some files new and others old.

DIR never overwrites a run or what the export did not write. Refused in one line (exit 2),
before any checkpoint is read: a DIR that is a file or cannot be written; a stage folder or
a workdir, or a folder inside one; a folder holding any file no export writes (even with
--overwrite: nothing is deleted that an export did not write); and, unless --overwrite is
given, a folder holding anything but a previous export of the same format (recognised by
its files and model.safetensors' metadata). --overwrite replaces a previous export of either
format, or a folder of only an export's file names, entirely.

What a format cannot express faithfully is refused in one line naming the option (exit 2),
never exported approximately. Needs numpy and safetensors only, not torch. This module is
the command and the stage's and the folder's side of it; each format writes its own files.
"""

from __future__ import annotations

import os
import shutil
import sys

import jax
import numpy as np

from big_pretrain import commands
from big_pretrain.errors import EXIT_STOPPED, EXIT_USAGE, ExportRefusedError
from big_pretrain.models.vit import ENCODER, parse_variant, vit_from_config
from big_pretrain.objectives import objective_class
from big_pretrain.stages import init_from as init_from_lib
from big_pretrain.stages import trained_stage
from big_pretrain.compile_for import REPORT_FOLDER
from big_pretrain.storage import files as storage
from big_pretrain.storage import stage_dir as stage_files
from big_pretrain.storage.checkpoints import unreadable_reason
from big_pretrain.storage.run_lock import LOCK_FILE
from big_pretrain.storage.stage_dir import StageDir
from big_pretrain.weights import FORMATS
from big_pretrain.weights.weight_format import StageModel, WeightFormat

PROGRAM = 'big_pretrain.export'  # every one-line message starts with it


def writable_formats() -> dict[str, WeightFormat]:
  """The formats --format takes, by name, in the table's order."""
  return {weight_format.name: weight_format for weight_format in FORMATS
          if weight_format.can_write}


def stage_model(config, encoder_only: bool) -> StageModel:
  """What an export writes of `config`'s stage (its head and MAE decoder, unless
  `encoder_only`)."""
  size = parse_variant(config.model.variant)
  objective = objective_class(config.objective.name)
  return StageModel(
      width=size.width, depth=size.depth, heads=size.heads, patch_size=size.patch_size,
      image_size=config.data.image_size, use_cls_token=config.model.use_cls_token,
      pool=config.model.pool, posemb=config.model.posemb,
      head=None if encoder_only else objective.exported_head(config),
      decoder=None if encoder_only else objective.exported_decoder(config))


def read_params(stage_dir: str, wanted: list[str], step: int | None) -> tuple[str, dict]:
  """(step dir, {name: numpy subtree}) of the `wanted` params the checkpoint has: of `step`,
  or of the newest step whose arrays match their digests (a damaged one is skipped)."""
  source = step_folder(stage_dir, step)
  saved = init_from_lib.saved_param_names(init_from_lib.resolve_checkpoint_dir(source))
  return init_from_lib.read_intact_subtrees(source, tuple(name for name in wanted if name in saved))


def step_folder(stage_dir: str, step: int | None) -> str:
  """The folder of `step`, checked; or the stage's folder of steps (step None)."""
  if step is None:
    return StageDir(stage_dir).checkpoints
  path = os.path.join(StageDir(stage_dir).checkpoints, str(step))
  reason = unreadable_reason(path) if storage.is_dir(path) else 'there is no such step'
  if reason:
    raise FileNotFoundError(f'Step {step} of {stage_dir} cannot be read ({reason}): leave '
                            '--step out to take the latest readable one.')
  return path


def read_stage_config(stage_dir: str):
  return trained_stage.read_stage_config(
      stage_dir, if_damaged='It records the model the checkpoint holds: restore it from a '
      'copy of the stage folder.',
      if_missing='point at the folder of a trained stage (it holds config.json and '
      'checkpoints/), e.g. WORKDIR/wsp.')


def stage_encoder_tokens(stage_dir: str, images: np.ndarray, *, step: int | None = None):
  """What an exported encoder must compute: this project's encoder of the stage, in float32,
  on normalized images (B, H, W, 3) -> its output tokens (B, [1 +] L, D), after the final
  LayerNorm (timm's forward_features, HF's last_hidden_state)."""
  config = read_stage_config(stage_dir)
  config.model.dtype = 'float32'
  encoder_params = read_params(stage_dir, [ENCODER], step)[1][ENCODER]
  encoder = vit_from_config(objective_class(config.objective.name).resolve_config(config).model)
  return np.asarray(encoder.apply({'params': encoder_params}, images)['tokens'])


def export(stage_dir: str, fmt: str, output: str, *, step: int | None = None,
           encoder_only: bool = False, overwrite: bool = False) -> dict:
  """Writes the stage's weights in `fmt` to the folder `output`, whole (the module doc);
  returns what was written."""
  formats = writable_formats()
  if fmt not in formats:
    raise ExportRefusedError(f'--format={fmt!r}: choose one of {", ".join(formats)}.')
  weight_format = formats[fmt]
  check_output(output, fmt, overwrite)  # before any checkpoint is read
  config = read_stage_config(stage_dir)
  model = stage_model(config, encoder_only)
  step_dir, params = read_params(stage_dir, weight_format.params_written(model), step)
  labels = None
  if model.head:
    labels = trained_stage.class_names(config, int(np.asarray(params['head']['kernel']).shape[-1]))
  exported = weight_format.write(model, params, labels)
  write_folder(output, exported.files)
  return {'step_dir': step_dir, 'output': output, 'format': fmt, 'model': exported.model,
          'arrays': exported.arrays, 'parameters': exported.parameters}


# --- The output folder: never a run's, never what an export did not write, written whole.

def check_output(output: str, fmt: str, overwrite: bool) -> None:
  """Raises a one-line error (exit 2) when `output` may not receive a `fmt` export: the
  module doc's refusals."""
  storage.check_writable_folder(
      output, '--output', 'give a folder this user can write, for the export alone',
      replaced_whole=True)
  for folder in _folder_and_ancestors(output):
    holder = _run_held_in(folder)
    if holder:
      raise ExportRefusedError(
          f'--output={output}: {folder} is {holder}, and an export there would mix with the '
          "run's files (a stage's config.json records what its checkpoints are): give a folder "
          'outside the run, e.g. exported/<stage>_<format>.')
  names = storage.list_dir(output)
  if not names:
    return
  exported_names = {name for weight_format in writable_formats().values()
                    for name in weight_format.export_files}
  stray = [name for name in names if name not in exported_names]
  if stray:
    raise ExportRefusedError(
        f'--output={output} holds {stray[0]!r}, which no export writes, so even --overwrite '
        'does not replace this folder (nothing an export did not write is deleted): give a '
        'new or empty folder.')
  previous = previous_export_format(output)
  if previous == fmt or overwrite:
    return
  held = (f'a {previous} export' if previous else
          f'{", ".join(names)}, not written by {PROGRAM} (or by a version before it recorded '
          'its format)')
  raise ExportRefusedError(
      f'--output={output} holds {held}: add --overwrite to replace it with the {fmt} export '
      '(every file of it), or give another folder.')


def previous_export_format(folder: str) -> str | None:
  """The format of the export of ours that `folder` holds, recognised by its content (each
  format's holds_export), or None."""
  return next((name for name, weight_format in writable_formats().items()
               if weight_format.holds_export(folder)), None)


def _folder_and_ancestors(path: str):
  """`path` made absolute (links followed), then each folder above it (a bucket's up to the
  bucket)."""
  folder = path.rstrip('/') if storage.is_bucket(path) else os.path.realpath(path)
  while True:
    yield folder
    parent = os.path.dirname(folder)
    if parent == folder or storage.is_bucket(parent) != storage.is_bucket(folder):
      return
    folder = parent


def _run_held_in(folder: str) -> str | None:
  """What of a run `folder` is ('a stage folder (it holds ...)', 'the workdir of a run ...'),
  or None.

  A chain's workdir holds its stages' folders and nothing else but run.lock and the compile
  reports (an empty folder may be a stage not yet written): a folder of other things beside
  a stage folder (/tmp beside a single-stage workdir) is not one."""
  try:
    held = _stage_files_in(folder)
    if held:
      return f'a stage folder (it holds {held})'
    stages = []
    for name in storage.list_dir(folder):
      path = os.path.join(folder, name)
      if _stage_files_in(path):
        stages.append(name)
      elif name not in (LOCK_FILE, REPORT_FOLDER) and (
          not storage.is_dir(path) or storage.list_dir(path)):
        return None
  except OSError:  # a folder this user may not list holds no run of theirs
    return None
  return f'the workdir of a run (it holds the stage folders {", ".join(stages)})' if (
      stages) else None


def _stage_files_in(folder: str) -> str | None:
  """The files that make `folder` a stage's (stage_dir.py), named; None if it is not one."""
  if storage.exists(os.path.join(folder, stage_files.CONFIG_FILE)) and storage.is_dir(
      os.path.join(folder, stage_files.CHECKPOINTS)):
    return f'{stage_files.CONFIG_FILE} and {stage_files.CHECKPOINTS}/'
  return next((name for name in (stage_files.HISTORY_FILE, LOCK_FILE, stage_files.JOB_FILE)
               if storage.exists(os.path.join(folder, name))), None)


def write_folder(output: str, contents: dict[str, bytes]) -> None:
  """Makes `contents` ({file name: bytes}) the whole of folder `output`: locally written
  beside it, then renamed into place; in a bucket, file by file, and then the files of a
  previous export that this one does not write are deleted (check_output allowed nothing
  else there)."""
  try:
    if storage.is_bucket(output):
      for name, data in contents.items():
        storage.write_bytes(os.path.join(output, name), data)
      for name in storage.list_dir(output):
        if name not in contents:
          storage.remove(os.path.join(output, name))
      return
    # A link's target is replaced, the link kept.
    _write_beside_and_rename(os.path.realpath(output), contents)
  except OSError as error:
    left = ('some of its files may be new and others not: export again' if
            storage.is_bucket(output) else 'it is as it was')
    raise OSError(f'Cannot write the export to {output} ({commands.one_line(error)}): '
                  f'{left}.') from error


def _write_beside_and_rename(output: str, contents: dict[str, bytes]) -> None:
  staged, previous = _beside(output, 'export-tmp'), None
  shutil.rmtree(staged, ignore_errors=True)  # left by a killed export of the same pid
  try:
    os.makedirs(staged)
    for name, data in contents.items():
      storage.write_bytes(os.path.join(staged, name), data)
    if os.path.lexists(output):
      previous = _beside(output, 'export-old')
      os.rename(output, previous)
    try:
      os.rename(staged, output)
    except OSError:
      if previous:
        os.rename(previous, output)
      raise
  except BaseException:  # a Ctrl-C too: nothing half-written stays behind
    shutil.rmtree(staged, ignore_errors=True)
    raise
  if previous:
    shutil.rmtree(previous, ignore_errors=True)  # the new export is in place already


def _beside(output: str, purpose: str) -> str:
  """A hidden folder next to `output`, this process's: '.<name>.<purpose>-<pid>'."""
  parent, name = os.path.split(output)
  return os.path.join(parent, f'.{name}.{purpose}-{os.getpid()}')


# --- The command.

def parse_args(argv):
  parser = commands.CommandParser(PROGRAM, description=__doc__.split('\n\n')[0])
  parser.add_argument('stage_dir', help="a trained stage's folder, e.g. workdirs/demo/wsp")
  parser.add_argument('--format', required=True, dest='fmt', choices=list(writable_formats()))
  parser.add_argument('--output', required=True,
                      help='the folder to write: a new or empty one, or a previous export')
  parser.add_argument(
      '--step', default=None,
      type=commands.value_type(int, 'give a step number (the folders in STAGE/checkpoints/)'),
      help='the checkpoint step (default: the latest readable one)')
  parser.add_argument('--encoder_only', action='store_true',
                      help='the encoder alone, without the head or MAE decoder')
  parser.add_argument('--overwrite', action='store_true',
                      help="replace a previous export of the other format (or an unrecognised "
                      "folder of an export's file names) in --output")
  return parser.parse_args(argv)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  # Reading a checkpoint needs no accelerator: leave a TPU or GPU to the runs that train.
  jax.config.update('jax_platforms', 'cpu')
  # No such stage or step (FileNotFoundError): nothing was started. Another OSError (a full
  # disk) stopped the export, and left the output as it was.
  with commands.one_line_errors(PROGRAM, argv, {FileNotFoundError: EXIT_USAGE,
                                                OSError: EXIT_STOPPED}):
    written = export(args.stage_dir, args.fmt, args.output, step=args.step,
                     encoder_only=args.encoder_only, overwrite=args.overwrite)
  print(f"Wrote {written['output']}: {written['model']} ({written['format']}), "
        f"{written['parameters']:,} parameters in {written['arrays']} arrays, from "
        f"{written['step_dir']}.")


if __name__ == '__main__':
  main()
