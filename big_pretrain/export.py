"""Export a trained stage's weights for timm or Hugging Face transformers.

  python -m big_pretrain.export WORKDIR/STAGE --format=timm --output=DIR [--step=N]
  python -m big_pretrain.export WORKDIR/STAGE --format=hf --output=DIR [--encoder_only]
      [--overwrite] [--verbose]

Reads the stage's Orbax checkpoint (its latest readable step, or --step) and the config
it recorded, and writes DIR/model.safetensors + DIR/config.json (+ preprocessor_config.json
for hf), model.safetensors' metadata recording that big_pretrain wrote it, in which format:

  timm   timm.create_model('local-dir:DIR', pretrained=True): a VisionTransformer with the
         stage's patch size, width, depth, heads, cls token or not, pooling, position
         embedding (the fixed sin-cos one stored as weights), LayerNorm eps 1e-6, image size
         and ImageNet mean/std; with the stage's classifier head where it has one (fine-
         tuning; WSP's hashtags as a multi-label head), else num_classes=0.
  hf     MAE: ViTMAEForPreTraining (encoder and decoder: keep pretraining, or show
         reconstructions); a classifier: ViTForImageClassification; any other encoder (FLIP's
         and LiT's image tower, AIM's trunk, WSP with --encoder_only): ViTModel.

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
never exported approximately. Needs numpy and safetensors only, not torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import jax
import numpy as np

from big_pretrain import commands
from big_pretrain.errors import EXIT_STOPPED, EXIT_USAGE, ExportRefusedError
from big_pretrain.models.patches import IMAGENET_MEAN, IMAGENET_STD, sincos_2d_position_embedding
from big_pretrain.models.vit import ENCODER, parse_variant, vit_from_config
from big_pretrain.objectives import objective_class
from big_pretrain.stages import stage_records, transfer
from big_pretrain.stages.compile_check import REPORT_FOLDER
from big_pretrain.storage import files as storage
from big_pretrain.storage import stage_dir as stage_files
from big_pretrain.storage.checkpoints import unreadable_reason
from big_pretrain.storage.run_lock import LOCK_FILE
from big_pretrain.storage.stage_dir import StageDir
from big_pretrain.weights import hf_layout, safetensors_format, timm_layout, weight_files

PROGRAM = 'big_pretrain.export'  # every one-line message starts with it
FORMATS = ('timm', 'hf')
PREPROCESSOR_FILE = 'preprocessor_config.json'
# The files an export of each format writes; nothing else is ever replaced or deleted.
EXPORT_FILES = {
    'timm': (weight_files.SAFETENSORS_FILE, weight_files.CONFIG_FILE),
    'hf': (weight_files.SAFETENSORS_FILE, weight_files.CONFIG_FILE, PREPROCESSOR_FILE),
}
# model.safetensors' metadata key naming the format big_pretrain exported it in.
EXPORT_MARK = 'big_pretrain_export'
# timm builds the model from config.json's model_args over this registered architecture's
# defaults; every argument that differs is in model_args.
TIMM_ARCHITECTURE = 'vit_base_patch16_224'


@dataclasses.dataclass(frozen=True)
class StageModel:
  """What an export needs to know of a stage: its ViT and what travels with it."""
  width: int
  depth: int
  heads: int
  patch_size: int
  image_size: int
  use_cls_token: bool
  pool: str
  posemb: str
  head: str | None           # 'single_label' / 'multi_label' / None
  decoder: dict | None       # MAE's decoder settings


def stage_model(config, encoder_only: bool) -> StageModel:
  size = parse_variant(config.model.variant)
  objective = objective_class(config.objective.name)
  return StageModel(
      width=size.width, depth=size.depth, heads=size.heads, patch_size=size.patch_size,
      image_size=config.data.image_size, use_cls_token=config.model.use_cls_token,
      pool=config.model.pool, posemb=config.model.posemb,
      head=None if encoder_only else objective.exported_head(config),
      decoder=None if encoder_only else objective.exported_decoder(config))


def patch_position_embedding(model: StageModel, encoder: dict) -> np.ndarray:
  """The (L, D) table the encoder adds to its patches."""
  if model.posemb == 'learned':
    return np.asarray(encoder['pos_embedding'])[0]
  grid = model.image_size // model.patch_size
  return sincos_2d_position_embedding(model.width, grid, grid)


def timm_files(model: StageModel, params: dict, labels: list[str] | None) -> tuple[dict, dict]:
  """(state dict, config.json) for timm's VisionTransformer."""
  if model.head and 'fc_norm' in params:
    raise ExportRefusedError(
        "timm's VisionTransformer normalizes either the tokens before pooling (norm) or the "
        "pooled feature (fc_norm), and this stage's model.pool='gap' classifier does both: "
        'export the encoder alone with --encoder_only (its features are exact), or fine-tune '
        "with model.pool='cls'.")
  state = timm_layout.encoder_to_torch(params[ENCODER],
                                       patch_position_embedding(model, params[ENCODER]))
  num_classes = 0
  if model.head:
    state.update(timm_layout.head_to_torch(params))
    num_classes = int(np.asarray(params['head']['kernel']).shape[-1])
  global_pool = 'token' if model.pool == 'cls' else 'avg'
  model_args = {
      'img_size': model.image_size, 'patch_size': model.patch_size, 'embed_dim': model.width,
      'depth': model.depth, 'num_heads': model.heads, 'mlp_ratio': 4.0, 'qkv_bias': True,
      'class_token': model.use_cls_token, 'no_embed_class': False,
      'global_pool': global_pool, 'fc_norm': False, 'num_classes': num_classes,
  }
  pretrained_cfg = {
      'input_size': [3, model.image_size, model.image_size], 'fixed_input_size': True,
      'interpolation': 'bilinear', 'crop_pct': 1.0, 'crop_mode': 'center',
      'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD), 'num_classes': num_classes,
      'first_conv': 'patch_embed.proj', 'classifier': 'head',
  }
  config = {'architecture': TIMM_ARCHITECTURE, 'num_classes': num_classes,
            'num_features': model.width, 'global_pool': global_pool,
            'model_args': model_args, 'pretrained_cfg': pretrained_cfg}
  if labels:
    config['label_names'] = labels
  if model.head:  # for people (timm reads no such field): softmax or one sigmoid per label
    config['head_activation'] = 'sigmoid' if model.head == 'multi_label' else 'softmax'
  return state, config


def hf_files(model: StageModel, params: dict, labels: list[str] | None) -> tuple[dict, dict]:
  """(state dict in the Hub's names, config.json) for transformers."""
  if not model.use_cls_token:
    raise ExportRefusedError(
        "transformers' ViT always prepends a cls token, and this stage's encoder has none "
        '(model.use_cls_token=False): its features would change. Use --format=timm.')
  if model.head and model.pool != 'cls':
    raise ExportRefusedError(
        "transformers' ViTForImageClassification classifies the cls token, and this stage "
        f"pools with model.pool={model.pool!r}: use --format=timm, or --encoder_only.")
  encoder = params[ENCODER]
  state = timm_layout.encoder_to_torch(encoder, patch_position_embedding(model, encoder))
  sizes = dict(width=model.width, depth=model.depth, heads=model.heads,
               patch_size=model.patch_size, image_size=model.image_size)
  if model.decoder:
    if model.decoder['encoder_on_all_tokens']:
      raise ExportRefusedError(
          'objective.encoder_on_all_tokens=True (the design MAE rejects) has a pixel-space '
          "mask patch that ViTMAE cannot express: use --encoder_only.")
    if model.posemb != 'sincos':
      raise ExportRefusedError(
          "ViTMAE's position embedding is the fixed sin-cos table, and this stage learned its "
          "own (model.posemb='learned'): use --encoder_only for a ViTModel.")
    grid = model.image_size // model.patch_size
    state.update(timm_layout.decoder_to_torch(
        params['decoder'], sincos_2d_position_embedding(model.decoder['width'], grid, grid),
        model.use_cls_token))
    config = hf_layout.vit_mae_config(
        **sizes, decoder_width=model.decoder['width'], decoder_depth=model.decoder['depth'],
        decoder_heads=model.decoder['heads'], mask_ratio=model.decoder['mask_ratio'],
        norm_pix_loss=model.decoder['norm_pix_loss'])
    return hf_layout.timm_to_hf(state), config
  if model.head:
    state.update(timm_layout.head_to_torch(params))
    return hf_layout.timm_to_hf(state), hf_layout.vit_config(
        **sizes, labels=labels, multi_label=model.head == 'multi_label')
  return hf_layout.timm_to_hf(state, encoder_prefix=''), hf_layout.vit_config(**sizes)


def read_params(stage_dir: str, wanted: list[str], step: int | None) -> tuple[str, dict]:
  """(step dir, {name: numpy subtree}) of the `wanted` params the checkpoint has: of `step`,
  or of the newest step whose arrays match their digests (a damaged one is skipped)."""
  source = step_folder(stage_dir, step)
  saved = transfer.saved_param_names(transfer.resolve_checkpoint_dir(source))
  return transfer.read_intact_subtrees(source, tuple(name for name in wanted if name in saved))


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
  return stage_records.read_stage_config(
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
  if fmt not in FORMATS:
    raise ExportRefusedError(f'--format={fmt!r}: choose one of {", ".join(FORMATS)}.')
  check_output(output, fmt, overwrite)  # before any checkpoint is read
  config = read_stage_config(stage_dir)
  model = stage_model(config, encoder_only)
  wanted = [ENCODER] + (['fc_norm', 'head'] if model.head else []) + (
      ['decoder'] if model.decoder and fmt == 'hf' else [])
  step_dir, params = read_params(stage_dir, wanted, step)
  labels = None
  if model.head:
    labels = stage_records.class_names(config, int(np.asarray(params['head']['kernel']).shape[-1]))
  writer = timm_files if fmt == 'timm' else hf_files
  state, model_config = writer(model, params, labels)
  state = {name: np.ascontiguousarray(value, np.float32) for name, value in state.items()}
  contents = {
      weight_files.CONFIG_FILE: json.dumps(model_config, indent=2).encode(),
      weight_files.SAFETENSORS_FILE: weight_files.safetensors_bytes(state, {EXPORT_MARK: fmt}),
  }
  if fmt == 'hf':
    contents[PREPROCESSOR_FILE] = json.dumps(
        hf_layout.image_processor_config(model.image_size), indent=2).encode()
  write_folder(output, contents)
  what = (model_config['architectures'][0] if fmt == 'hf'
          else f"VisionTransformer, num_classes={model_config['num_classes']}")
  return {'step_dir': step_dir, 'output': output, 'format': fmt, 'model': what,
          'arrays': len(state), 'parameters': int(sum(v.size for v in state.values()))}


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
  stray = [name for name in names if name not in EXPORT_FILES['hf']]
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
  """The format of the export of ours that `folder` holds, recognised by its content (only
  that format's files, and model.safetensors' metadata naming it), or None."""
  names = set(storage.list_dir(folder))
  recorded = safetensors_format.read_metadata(os.path.join(folder, weight_files.SAFETENSORS_FILE)).get(
      EXPORT_MARK)
  return recorded if recorded in FORMATS and names <= set(EXPORT_FILES[recorded]) else None


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
  parser.add_argument('--format', required=True, choices=FORMATS, dest='fmt')
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
