"""Weights out to timm and Hugging Face transformers, and in from public checkpoints, proven
against the real libraries (torch, timm, transformers: test-only dependencies).

Parity: each exported model computes, in PyTorch, what ours computes in JAX on the same
images, in float32. The two compute the same sums in other orders (XLA's and PyTorch's
matmul and LayerNorm reductions, erf-GELU kernels a few ulps apart), over at most a few
hundred terms per reduction in these tiny models, so the differences are float32 rounding
scaled by the tensors' sizes: helpers.numerics.REORDERED_FLOAT32 (1e-5 of each tensor's
scale) holds them on every CPU (measured here: 3.4e-6), while a real difference is far
above it (measured: q and k swapped in one block, 0.39 of the scale; one projection's heads
interleaved, 0.64). The LayerNorm eps is below what parity can see at this size (1e-12
instead of 1e-6 moved outputs by 1e-5 of their scale), so the exported models' eps is
asserted directly.

Import: every format round-trips, import(export(params)) == params, bit for bit.
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
transformers = pytest.importorskip('transformers')
pytestmark = pytest.mark.interop  # the test tiers: pytest.ini

from big_pretrain import export as export_lib  # noqa: E402
from big_pretrain.errors import (CheckpointMismatchError, ConfigError,  # noqa: E402
                                 DamagedFileError, ExportRefusedError, NonFiniteWeightsError)
from big_pretrain.models import transformer  # noqa: E402
from big_pretrain.models.patches import normalize_images, patchify  # noqa: E402
from big_pretrain.models.masking import random_masking  # noqa: E402
from big_pretrain.objectives import build_objective  # noqa: E402
from big_pretrain.objectives.mae import masked_patch_loss, normalize_patches  # noqa: E402
from big_pretrain.stages import init_from as init_from_lib  # noqa: E402
from big_pretrain.stages.chain import initializer_from  # noqa: E402
from big_pretrain.stages.chain_validation import validate_config  # noqa: E402
from big_pretrain.train.loop import train_stage  # noqa: E402
from big_pretrain.weights import (FORMATS, public_checkpoints, timm_layout,  # noqa: E402
                                   weight_files)
from big_pretrain.weights.weight_format import patch_position_embedding  # noqa: E402
from helpers.numerics import assert_close_in_scale  # noqa: E402
from helpers.tiny_config import (one_device, tiny_finetune_config, tiny_flip_config,  # noqa: E402
                                 tiny_mae_config, tiny_trainer, tiny_wsp_config)
from helpers.trees import assert_trees_equal  # noqa: E402

torch.set_num_threads(1)  # deterministic reductions, and the suite's workers share 2 cores


def _aim_config():
  from big_pretrain.config.defaults import tiny_stage_config  # pylint: disable=import-outside-toplevel
  return tiny_stage_config('aim', **{'data.num_examples': 64, 'batch_size': 8})


CONFIGS = {
    'mae': tiny_mae_config,
    'wsp': tiny_wsp_config,
    'finetune_cls': lambda: tiny_finetune_config(**{'model.pool': 'cls'}),
    'finetune_gap': tiny_finetune_config,
    'flip': tiny_flip_config,
    'flip_cls': lambda: _with_model(tiny_flip_config(), use_cls_token=True, pool='cls'),
    'aim': _aim_config,
}


def _with_model(config, **model):
  config.model.update(model)
  return config


def _random_params(config, seed=0):
  """The objective's parameters, every leaf drawn at random (zero-initialized heads and
  biases would hide a transposed or misplaced one)."""
  objective = build_objective(config)
  shapes = jax.eval_shape(objective.init_params, jax.random.key(0))
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  shapes = nn.meta.unbox(shapes)
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(seed)
  values = [rng.normal(0, 0.5, leaf.shape).astype(np.float32) for leaf in leaves]
  params = jax.tree_util.tree_unflatten(treedef, values)
  for norm in _norms(params):  # LayerNorm scales near 1, as trained ones are
    norm['scale'] = (1 + 0.1 * rng.normal(size=norm['scale'].shape)).astype(np.float32)
  return objective, params


def _norms(tree):
  if isinstance(tree, dict):
    if set(tree) == {'scale', 'bias'}:
      yield tree
    else:
      for value in tree.values():
        yield from _norms(value)


def _images(config, batch=3, seed=1):
  """Normalized float32 images (B, H, W, 3) for ours and (B, 3, H, W) for torch."""
  size = config.data.image_size
  pixels = np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), np.uint8)
  images = np.asarray(normalize_images(pixels), np.float32)
  return images, torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def _export(config, params, fmt, output, encoder_only=False):
  model = export_lib.stage_model(config, encoder_only)
  labels = ([f'label_{i}' for i in range(params['head']['kernel'].shape[-1])]
            if model.head else None)
  exported = FORMATS[fmt].write(model, params, labels)
  os.makedirs(output, exist_ok=True)
  for name, data in exported.files.items():
    with open(os.path.join(output, name), 'wb') as f:
      f.write(data)
  return output


def _our_tokens(objective, params, images):
  """The encoder's output tokens (cls first), after its final LayerNorm."""
  return np.asarray(objective.model.encoder.apply({'params': params['encoder']}, images)['tokens'])


def _timm_model(folder):
  model = timm.create_model(f'local-dir:{folder}', pretrained=True)
  return model.eval()


@pytest.mark.parametrize('name,encoder_only', [
    ('mae', False), ('wsp', False), ('finetune_cls', False), ('finetune_gap', True),
    ('flip', False), ('aim', False)])
def test_timm_export_computes_our_features_and_logits(name, encoder_only, tmp_path):
  config = CONFIGS[name]()
  objective, params = _random_params(config)
  folder = _export(config, params, 'timm', str(tmp_path / 'timm'), encoder_only)
  model = _timm_model(folder)
  images, pixels = _images(config)
  with torch.no_grad():
    features = model.forward_features(pixels).numpy()
    outputs = model(pixels).numpy()
  assert_close_in_scale(features, _our_tokens(objective, params, images), what='tokens')
  assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
  if name in ('wsp', 'finetune_cls') and not encoder_only:
    logits = np.asarray(objective.model.apply({'params': params}, images))
    assert outputs.shape == logits.shape
    assert_close_in_scale(outputs, logits, what='logits')
  else:  # no head: the pooled feature, as our encoder pools it
    pooled = objective.model.encoder.apply({'params': params['encoder']}, images)['pooled']
    assert model.num_classes == 0
    assert_close_in_scale(outputs, np.asarray(pooled), what='pooled')


@pytest.mark.parametrize('name', ['wsp', 'finetune_cls', 'mae', 'flip_cls'])
def test_hf_export_computes_our_features_and_logits(name, tmp_path):
  config = CONFIGS[name]()
  objective, params = _random_params(config)
  images, pixels = _images(config)
  tokens = _our_tokens(objective, params, images)
  encoder_folder = _export(config, params, 'hf', str(tmp_path / 'encoder'), encoder_only=True)
  encoder = transformers.ViTModel.from_pretrained(encoder_folder, add_pooling_layer=False).eval()
  with torch.no_grad():
    hidden = encoder(pixel_values=pixels).last_hidden_state.numpy()
  assert_close_in_scale(hidden, tokens, what='last_hidden_state')
  assert encoder.config.layer_norm_eps == 1e-6
  if name in ('wsp', 'finetune_cls'):
    folder = _export(config, params, 'hf', str(tmp_path / 'classifier'))
    classifier, info = transformers.ViTForImageClassification.from_pretrained(
        folder, output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'], info
    with torch.no_grad():
      logits = classifier.eval()(pixel_values=pixels).logits.numpy()
    assert_close_in_scale(logits, np.asarray(objective.model.apply({'params': params}, images)),
                          what='logits')


def test_hf_mae_export_reconstructs_and_scores_as_ours(tmp_path):
  """ViTMAEForPreTraining, given our mask's noise, predicts our pixels and our loss."""
  config = tiny_mae_config()
  objective, params = _random_params(config)
  folder = _export(config, params, 'hf', str(tmp_path / 'mae'))
  model, info = transformers.ViTMAEForPreTraining.from_pretrained(folder, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  images, pixels = _images(config)
  mask_rng = jax.random.key(7)
  num_patches = (config.data.image_size // 8) ** 2
  ratio = config.objective.mask_ratio
  masking = random_masking(mask_rng, images.shape[0], num_patches, ratio)
  noise = np.array(jax.random.uniform(mask_rng, (images.shape[0], num_patches)))
  pred, _ = objective.model.apply({'params': params}, jnp.asarray(images), mask_rng, ratio)
  target = normalize_patches(patchify(jnp.asarray(images), 8))
  loss = float(masked_patch_loss(pred, target, masking.mask))
  with torch.no_grad():
    out = model.eval()(pixel_values=pixels, noise=torch.from_numpy(noise))
  np.testing.assert_array_equal(out.mask.numpy(), np.asarray(masking.mask))
  assert_close_in_scale(out.logits.numpy(), np.asarray(pred), what='reconstruction')
  assert_close_in_scale(out.loss.item(), loss, what='loss')


@pytest.mark.parametrize('name,fmt', [('mae', 'timm'), ('mae', 'hf'), ('wsp', 'timm'),
                                      ('wsp', 'hf'), ('finetune_cls', 'timm'), ('aim', 'timm')])
def test_import_of_an_export_is_bit_exact(name, fmt, tmp_path):
  config = CONFIGS[name]()
  _, params = _random_params(config)
  folder = _export(config, params, fmt, str(tmp_path / fmt))
  parts = public_checkpoints.read_public_checkpoint(folder, params)
  for part in [p for p in ('encoder', 'decoder', 'head', 'fc_norm') if p in parts]:
    assert_trees_equal(parts[part], transformer.scanned_to_unrolled(params[part]))
  assert 'encoder' in parts and ('head' in parts) == (name in ('wsp', 'finetune_cls'))
  assert ('decoder' in parts) == (name == 'mae' and fmt == 'hf')


@pytest.mark.parametrize('posemb', ['learned', 'sincos'])
def test_a_bf16_checkpoint_imports_as_its_values_widened_to_float32(tmp_path, posemb):
  """Public checkpoints often ship in bfloat16 (which the safetensors library's numpy
  reader cannot read): the import equals that of the same values, widened to float32 by
  torch (an exact conversion), bit for bit. Its copy of the fixed sin-cos table, rounded to
  bfloat16, is still ours (within half a bfloat16 ulp)."""
  from safetensors import torch as safetensors_torch  # pylint: disable=import-outside-toplevel
  config = tiny_wsp_config(posemb=posemb)
  _, params = _random_params(config)
  folder = _export(config, params, 'timm', str(tmp_path / 'timm'))
  state = safetensors_torch.load_file(os.path.join(folder, 'model.safetensors'))
  bf16 = {name: tensor.bfloat16() for name, tensor in state.items()}
  safetensors_torch.save_file(bf16, str(tmp_path / 'bf16.safetensors'))
  weight_files.write_safetensors(str(tmp_path / 'widened.safetensors'),
                                 {name: tensor.float().numpy() for name, tensor in bf16.items()})
  parts = public_checkpoints.read_public_checkpoint(str(tmp_path / 'bf16.safetensors'), params)
  assert_trees_equal(parts, public_checkpoints.read_public_checkpoint(
      str(tmp_path / 'widened.safetensors'), params))
  assert not np.array_equal(parts['head']['kernel'], params['head']['kernel'])  # bf16 values


@pytest.mark.parametrize('fmt', ['timm', 'hf'])
def test_a_model_folder_without_config_json_imports_as_with_it(fmt, tmp_path):
  """A folder whose config.json was not copied: read by its weights' names, not taken for
  an Orbax checkpoint."""
  config = tiny_wsp_config()
  _, params = _random_params(config)
  folder = _export(config, params, fmt, str(tmp_path / fmt))
  with_config = public_checkpoints.read_public_checkpoint(folder, params)
  os.remove(os.path.join(folder, 'config.json'))
  assert public_checkpoints.is_public_checkpoint(folder)
  assert_trees_equal(public_checkpoints.read_public_checkpoint(folder, params), with_config)


def test_a_learned_position_embedding_is_resampled_to_the_stage_grid(tmp_path):
  """A 4x4-patch export starts an 8x8-patch stage: its table resized, as for Orbax sources."""
  from big_pretrain.models import vit  # pylint: disable=import-outside-toplevel
  small = tiny_wsp_config(posemb='learned')
  _, params = _random_params(small)
  folder = _export(small, params, 'timm', str(tmp_path / 'timm'))
  large = tiny_wsp_config(posemb='learned')
  large.data.image_size = 64
  _, trainer = tiny_trainer(large, one_device())
  fresh = trainer.init_state(jax.random.key(1)).params
  loaded = init_from_lib.load_public_into(fresh, folder, ('encoder',))
  np.testing.assert_array_equal(
      np.asarray(loaded['encoder']['pos_embedding']),
      vit.resample_position_embedding(params['encoder']['pos_embedding'], 64))


def _mae_reference_pth(params, path, extra=None):
  """A MAE release: {'model': timm names + decoder_* + mask_token}, as torch tensors."""
  config = tiny_mae_config()
  model = export_lib.stage_model(config, encoder_only=False)
  encoder = params['encoder']
  state = timm_layout.encoder_to_torch(encoder, patch_position_embedding(model, encoder))
  from big_pretrain.models.patches import sincos_2d_position_embedding  # pylint: disable=import-outside-toplevel
  state.update(timm_layout.decoder_to_torch(params['decoder'],
                                            sincos_2d_position_embedding(32, 4, 4), True))
  checkpoint = {'model': {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}
  checkpoint.update(extra or {})
  torch.save(checkpoint, path)
  return path


def test_a_mae_reference_pth_and_a_big_vision_npz_import_bit_exactly(tmp_path):
  config = tiny_mae_config()
  _, params = _random_params(config)
  pth = _mae_reference_pth(params, str(tmp_path / 'mae_pretrain_vit_mu.pth'))
  parts = public_checkpoints.read_public_checkpoint(pth, params)
  assert_trees_equal(parts['encoder'], params['encoder'])
  assert_trees_equal(parts['decoder'], params['decoder'])
  # big_vision: the same kernels under its module names, a learned position embedding.
  learned_config = tiny_wsp_config(posemb='learned')
  _, wsp_params = _random_params(learned_config)
  encoder = wsp_params['encoder']
  flat = {'params/embedding/kernel': encoder['patch_embed']['kernel'],
          'params/embedding/bias': encoder['patch_embed']['bias'],
          'params/cls': encoder['cls_token'], 'params/pos_embedding': encoder['pos_embedding'],
          'params/Transformer/encoder_norm/scale': encoder['transformer']['norm']['scale'],
          'params/Transformer/encoder_norm/bias': encoder['transformer']['norm']['bias'],
          'params/head/kernel': wsp_params['head']['kernel'],
          'params/head/bias': wsp_params['head']['bias']}
  names = {'norm1': 'LayerNorm_0', 'norm2': 'LayerNorm_1',
           'attention': 'MultiHeadDotProductAttention_0', 'mlp/fc1': 'MlpBlock_0/Dense_0',
           'mlp/fc2': 'MlpBlock_0/Dense_1'}
  for layer in range(2):
    block = encoder['transformer'][f'block_{layer}']
    for ours, theirs in names.items():
      node = block
      for part in ours.split('/'):
        node = node[part]
      for path, leaf in jax.tree_util.tree_leaves_with_path(node):
        key = jax.tree_util.keystr(path, simple=True, separator='/')
        flat[f'params/Transformer/encoderblock_{layer}/{theirs}/{key}'] = leaf
  np.savez(tmp_path / 'bv.npz', **flat)
  parts = public_checkpoints.read_public_checkpoint(str(tmp_path / 'bv.npz'), wsp_params)
  assert_trees_equal(parts['encoder'], encoder)
  assert_trees_equal(parts['head'], wsp_params['head'])


@pytest.mark.integration
def test_a_wsp_stage_starts_from_a_mae_reference_pth_and_trains(tmp_path):
  """The MAWS chain from public MAE weights: the WSP stage's starting encoder is the
  imported one, bit for bit, in its own (scanned) layout, and it trains."""
  _, mae_params = _random_params(tiny_mae_config())
  pth = _mae_reference_pth(mae_params, str(tmp_path / 'mae.pth'))
  config = tiny_wsp_config(scan=True)
  config.init_from.checkpoint = pth
  _, trainer = tiny_trainer(config, one_device())
  fresh = trainer.init_state(jax.random.key(1)).params
  started = initializer_from(config.init_from, str(tmp_path))(fresh)
  assert_trees_equal(jax.device_get(started['encoder']),
                     transformer.unrolled_to_scanned(mae_params['encoder']))
  result = train_stage(config, str(tmp_path / 'wsp'), devices=one_device(),
                       initialize=initializer_from(config.init_from, str(tmp_path)))
  assert result.finished and np.isfinite(result.last_metrics['loss'])


@pytest.mark.integration
def test_export_command_writes_a_folder_timm_loads(tmp_path):
  """`python -m big_pretrain.export STAGE --format=timm` on a trained stage folder (its
  output outside the run's workdir: an export into it is refused)."""
  config = tiny_wsp_config()
  stage = str(tmp_path / 'run' / 'wsp')
  result = train_stage(config, stage, devices=one_device())
  export_lib.main([stage, '--format=timm', f'--output={tmp_path / "out"}'])
  model = _timm_model(str(tmp_path / 'out'))
  images, pixels = _images(config)
  objective = build_objective(config)
  params = jax.device_get(result.state.params)
  with torch.no_grad():
    logits = model(pixels).numpy()
  assert_close_in_scale(logits, np.asarray(objective.model.apply({'params': params}, images)),
                        what='logits')


@pytest.mark.parametrize('name,fmt,encoder_only,match', [
    ('finetune_gap', 'timm', False, r"model.pool='gap' classifier does both"),
    ('flip', 'hf', False, r'model.use_cls_token=False'),
    ('aim', 'hf', True, r'model.use_cls_token=False'),
])
def test_what_a_format_cannot_express_is_refused_in_one_line(name, fmt, encoder_only, match,
                                                             tmp_path):
  config = CONFIGS[name]()
  _, params = _random_params(config)
  with pytest.raises(ExportRefusedError, match=match) as error:
    _export(config, params, fmt, str(tmp_path / 'x'), encoder_only=encoder_only)
  assert '\n' not in str(error.value)


def test_bad_public_checkpoints_end_in_one_line(tmp_path):
  config = tiny_wsp_config()
  _, params = _random_params(config)
  folder = _export(config, params, 'timm', str(tmp_path / 'timm'))
  # Another depth and width: named with both sizes and the variant to choose.
  _, bigger = _random_params(tiny_wsp_config(variant='Ti/8'))
  cases = [
      (lambda: init_from_lib.load_public_into(bigger, folder, ('encoder',)), CheckpointMismatchError,
       r"2 blocks of width 64; the model of this config has 12 blocks of width 192: set "
       r"model.variant to the checkpoint's size \('mu/8'\)"),
  ]
  # A .pth holding more than tensors (a training checkpoint's argparse.Namespace).
  _mae_reference_pth(_random_params(tiny_mae_config())[1], str(tmp_path / 'args.pth'),
                     extra={'args': argparse.Namespace(lr=1e-3)})
  cases.append((lambda: public_checkpoints.read_public_checkpoint(str(tmp_path / 'args.pth'),
                                                                  params),
                DamagedFileError,
                r"holds objects other than tensors: 'args' \(argparse\.Namespace\)\. "))
  # An unknown format.
  (tmp_path / 'weights.h5').write_bytes(b'\x89HDF')
  cases.append((lambda: public_checkpoints.read_public_checkpoint(str(tmp_path / 'weights.h5'),
                                                                  params),
                CheckpointMismatchError, r'unknown checkpoint format'))
  # A safetensors file cut short.
  data = (tmp_path / 'timm' / 'model.safetensors').read_bytes()
  (tmp_path / 'cut.safetensors').write_bytes(data[:len(data) // 2])
  cases.append((lambda: public_checkpoints.read_public_checkpoint(
      str(tmp_path / 'cut.safetensors'), params), DamagedFileError, r'cut short'))
  # A mis-shaped entry: named with both shapes.
  state = weight_files.read_safetensors(str(tmp_path / 'timm' / 'model.safetensors'))
  state['blocks.0.mlp.fc1.weight'] = state['blocks.0.mlp.fc1.weight'][:128]
  state['blocks.0.mlp.fc1.bias'] = state['blocks.0.mlp.fc1.bias'][:128]
  weight_files.write_safetensors(str(tmp_path / 'narrow.safetensors'), state)
  cases.append((lambda: init_from_lib.load_public_into(params, str(tmp_path / 'narrow.safetensors'),
                                                  ('encoder',)),
                CheckpointMismatchError,
                r'encoder/transformer/block_0/mlp/fc1/bias is \(128,\) there and \(256,\) here'))
  # A NaN among the weights: named where it is, not found as a NaN loss at the first step.
  state['blocks.1.attn.proj.weight'][0, 0] = np.nan
  weight_files.write_safetensors(str(tmp_path / 'nan.safetensors'), state)
  cases.append((lambda: public_checkpoints.read_public_checkpoint(
      str(tmp_path / 'nan.safetensors'), params), NonFiniteWeightsError,
                r"nan.safetensors: 'blocks.1.attn.proj.weight' holds 1 NaN and 0 Inf values"))
  for run, error_type, match in cases:
    with pytest.raises(error_type, match=match) as error:
      run()
    assert '\n' not in str(error.value), str(error.value)


def test_a_missing_init_from_checkpoint_is_refused_before_anything_runs(tmp_path):
  config = tiny_wsp_config()
  config.init_from.checkpoint = str(tmp_path / 'mae_pretrain_vit_base.pth')
  with pytest.raises(ConfigError, match=r'init_from.checkpoint=.*mae_pretrain_vit_base.pth.* '
                                        r'does not exist'):
    validate_config(config)
