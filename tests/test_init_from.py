"""MAE -> WSP: the encoder is copied bit-exactly, layouts convert, shapes are checked."""

import logging

import jax
import numpy as np
import pytest

from big_pretrain.errors import CheckpointMismatchError, CheckpointUnreadableError
from big_pretrain.models import transformer, vit
from big_pretrain.stages import init_from as init_from_lib
from big_pretrain.train import loop
from big_pretrain.train.loop import train_stage
from helpers.tiny_config import one_device, tiny_mae_config, tiny_trainer, tiny_wsp_config
from helpers.trees import assert_trees_equal


def _fresh_wsp_params(config):
  """A WSP stage's initial parameters, on all 8 devices."""
  _, trainer = tiny_trainer(config, jax.devices())
  return trainer.init_state(jax.random.key(1)).params


@pytest.fixture(scope='module')
def mae_run(tmp_path_factory):
  """A tiny MAE trained 2 steps (scanned layers), and its final parameters."""
  workdir = tmp_path_factory.mktemp('mae')
  result = train_stage(tiny_mae_config(total_steps=2, **{'model.scan': True}), str(workdir),
                       devices=one_device())
  return str(workdir), jax.device_get(result.state.params)


@pytest.mark.parametrize('scan', [True, False])
@pytest.mark.integration
def test_mae_to_wsp_copies_every_encoder_tensor_bit_exactly(mae_run, scan, caplog):
  workdir, mae_params = mae_run
  config = tiny_wsp_config(scan=scan)
  fresh = _fresh_wsp_params(config)
  with caplog.at_level(logging.WARNING):
    loaded = init_from_lib.load_into(fresh, init_from_lib.resolve_checkpoint_dir(workdir), ('encoder',))
  # A normal chain prints no warning (Orbax once warned of missing step metadata).
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
  assert set(loaded) == {'encoder', 'head'}  # no decoder, no mask token
  expected = mae_params['encoder'] if scan else transformer.scanned_to_unrolled(mae_params['encoder'])
  got = jax.device_get(loaded['encoder'])
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
  assert_trees_equal(got, expected)
  # The head keeps its fresh (zero) initialization; shardings are the fresh ones.
  assert_trees_equal(jax.device_get(loaded['head']), jax.device_get(fresh['head']))
  for new, old in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(fresh)):
    assert new.sharding == old.sharding


@pytest.mark.integration
def test_a_shape_mismatch_names_the_parameter_and_both_shapes(mae_run):
  workdir, _ = mae_run
  fresh = _fresh_wsp_params(tiny_wsp_config(variant='mu/4'))  # patch 4 instead of 8
  with pytest.raises(CheckpointMismatchError,
                     match=r'patch_embed/kernel: checkpoint \(8, 8, 3, 64\) vs model \(4, 4, 3, 64\)'):
    init_from_lib.load_into(fresh, init_from_lib.resolve_checkpoint_dir(workdir), ('encoder',))


@pytest.mark.integration
def test_init_from_that_does_not_fit_is_named_before_anything_compiles(mae_run, monkeypatch,
                                                                       tmp_path):
  """The starting parameters are read and checked against the model's shapes before the step
  compiles (and before the stage writes anything)."""
  workdir, _ = mae_run

  def compile_step(*args, **kwargs):
    raise AssertionError('the step was compiled before init_from was checked')

  monkeypatch.setattr(loop, 'build_with_remat_choice', compile_step)
  config = tiny_wsp_config(variant='mu/4')
  with pytest.raises(CheckpointMismatchError, match=r'patch_embed/kernel: checkpoint'):
    train_stage(config, str(tmp_path / 'wsp'), devices=one_device(),
                initialize=lambda params: init_from_lib.load_from(params, workdir, ('encoder',)))
  assert not (tmp_path / 'wsp' / 'checkpoints').exists()


@pytest.mark.integration
def test_taking_a_subtree_the_checkpoint_lacks_is_named(mae_run):
  workdir, _ = mae_run
  fresh = _fresh_wsp_params(tiny_wsp_config())
  with pytest.raises(CheckpointMismatchError, match=r'params/head'):
    init_from_lib.load_into(fresh, init_from_lib.resolve_checkpoint_dir(workdir), ('head',))


def test_missing_checkpoint_is_named(tmp_path):
  with pytest.raises(CheckpointUnreadableError, match=f'No checkpoint found at {tmp_path}'):
    init_from_lib.resolve_checkpoint_dir(str(tmp_path))


def test_position_embedding_resampling_keeps_a_constant_constant():
  constant = np.full((1, 16, 8), 0.37, np.float32)
  resampled = vit.resample_position_embedding(constant, 64)
  assert resampled.shape == (1, 64, 8)
  np.testing.assert_allclose(resampled, 0.37, rtol=1e-6)
  ramp = np.arange(16, dtype=np.float32).reshape(1, 16, 1)
  assert vit.resample_position_embedding(ramp, 16) is ramp  # same grid: untouched
  with pytest.raises(CheckpointMismatchError, match='square'):
    vit.resample_position_embedding(constant, 60)


@pytest.mark.integration
def test_learned_position_embedding_is_resampled_on_load(tmp_path):
  mae = train_stage(tiny_mae_config(total_steps=1, **{'model.posemb': 'learned'}), str(tmp_path),
                    devices=one_device())
  wsp = tiny_wsp_config(posemb='learned')
  wsp.data.image_size = 64  # 8x8 patch grid instead of 4x4
  loaded = init_from_lib.load_into(_fresh_wsp_params(wsp), init_from_lib.resolve_checkpoint_dir(str(tmp_path)),
                              ('encoder',))
  old = np.asarray(mae.state.params['encoder']['pos_embedding'])
  new = np.asarray(loaded['encoder']['pos_embedding'])
  assert new.shape == (1, 64, 64)
  np.testing.assert_allclose(new, vit.resample_position_embedding(old, 64))


def test_scanned_unrolled_round_trip():
  rng = np.random.default_rng(0)
  scanned = {'patch_embed': {'kernel': rng.normal(size=(2, 3))},
             'transformer': {'blocks': {'mlp': {'kernel': rng.normal(size=(4, 5, 6)),
                                                'bias': rng.normal(size=(4, 6))}},
                             'norm': {'scale': rng.normal(size=(5,))}}}
  unrolled = transformer.scanned_to_unrolled(scanned)
  assert sorted(unrolled['transformer']) == ['block_0', 'block_1', 'block_2', 'block_3', 'norm']
  np.testing.assert_array_equal(unrolled['transformer']['block_2']['mlp']['kernel'],
                                scanned['transformer']['blocks']['mlp']['kernel'][2])
  back = transformer.unrolled_to_scanned(unrolled)
  assert_trees_equal(back, scanned)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(scanned)
  again = transformer.scanned_to_unrolled(back)
  assert_trees_equal(again, unrolled)
