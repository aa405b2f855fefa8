"""Export a trained stage's weights for timm or Hugging Face transformers.

  python -m big_pretrain.export WORKDIR/STAGE --format=timm --output=DIR [--step=N]
  python -m big_pretrain.export WORKDIR/STAGE --format=hf --output=DIR [--encoder_only]

Reads the stage's Orbax checkpoint (its latest readable step, or --step) and the config
it recorded, and writes DIR/model.safetensors + DIR/config.json (+ preprocessor_config.json
for hf):

  timm   timm.create_model('local-dir:DIR', pretrained=True): a VisionTransformer with the
         stage's patch size, width, depth, heads, cls token or not, pooling, position
         embedding (the fixed sin-cos one stored as weights), LayerNorm eps 1e-6, image size
         and ImageNet mean/std; with the stage's classifier head where it has one (fine-
         tuning; WSP's hashtags as a multi-label head), else num_classes=0.
  hf     MAE: ViTMAEForPreTraining (encoder and decoder: keep pretraining, or show
         reconstructions); a classifier: ViTForImageClassification; any other encoder (FLIP's
         and LiT's image tower, AIM's trunk, WSP with --encoder_only): ViTModel.

What a format cannot express faithfully is refused in one line naming the option (exit 2),
never exported approximately. Needs numpy and safetensors only, not torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import numpy as np

from big_pretrain.errors import EXIT_USAGE, ExportRefusedError, UserFacingError
from big_pretrain.models.patches import IMAGENET_MEAN, IMAGENET_STD, sincos_2d_position_embedding
from big_pretrain.models.vit import ENCODER, parse_variant, vit_from_config
from big_pretrain.objectives import objective_class
from big_pretrain.stages import stage_records, transfer
from big_pretrain.storage import files as storage
from big_pretrain.storage.checkpoints import unreadable_reason
from big_pretrain.storage.stage_dir import StageDir
from big_pretrain.weights import hf_layout, timm_layout, weight_files

FORMATS = ('timm', 'hf')
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
           encoder_only: bool = False) -> dict:
  """Writes the stage's weights in `fmt` to `output`; returns what was written."""
  if fmt not in FORMATS:
    raise ExportRefusedError(f'--format={fmt!r}: choose one of {FORMATS}.')
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
  state = {name: np.asarray(value, np.float32) for name, value in state.items()}
  weight_files.write_safetensors(os.path.join(output, weight_files.SAFETENSORS_FILE), state)
  storage.write_text(os.path.join(output, weight_files.CONFIG_FILE),
                     json.dumps(model_config, indent=2))
  if fmt == 'hf':
    storage.write_text(os.path.join(output, 'preprocessor_config.json'),
                       json.dumps(hf_layout.image_processor_config(model.image_size), indent=2))
  what = (model_config['architectures'][0] if fmt == 'hf'
          else f"VisionTransformer, num_classes={model_config['num_classes']}")
  return {'step_dir': step_dir, 'output': output, 'format': fmt, 'model': what,
          'arrays': len(state), 'parameters': int(sum(v.size for v in state.values()))}


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m big_pretrain.export', description=__doc__.split('\n\n')[0])
  parser.add_argument('stage_dir', help="a trained stage's folder, e.g. workdirs/demo/wsp")
  parser.add_argument('--format', required=True, choices=FORMATS, dest='fmt')
  parser.add_argument('--output', required=True, help='the folder to write')
  parser.add_argument('--step', type=int, default=None,
                      help='the checkpoint step (default: the latest readable one)')
  parser.add_argument('--encoder_only', action='store_true',
                      help='the encoder alone, without the head or MAE decoder')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  # Reading a checkpoint needs no accelerator: leave a TPU or GPU to the runs that train.
  jax.config.update('jax_platforms', 'cpu')
  try:
    written = export(args.stage_dir, args.fmt, args.output, step=args.step,
                     encoder_only=args.encoder_only)
  except (UserFacingError, FileNotFoundError) as error:
    print(f'big_pretrain.export: {error}', file=sys.stderr)
    sys.exit(getattr(error, 'exit_code', EXIT_USAGE))
  print(f"Wrote {written['output']}: {written['model']} ({written['format']}), "
        f"{written['parameters']:,} parameters in {written['arrays']} arrays, from "
        f"{written['step_dir']}.")


if __name__ == '__main__':
  main()
