"""A resumed run is the same run: its recorded config is checked, and every
unreadable checkpoint falls back to the previous readable one."""

import json
import logging
import shutil

import pytest

from big_pretrain.config.defaults import SCHEMA_VERSION
from big_pretrain.errors import CheckpointMismatchError
from big_pretrain.errors import ConfigError, DamagedFileError
from big_pretrain.stages import chain
from big_pretrain.stages import init_from as init_from_lib
from big_pretrain.storage import resume_identity
from big_pretrain.storage.checkpoints import Checkpointer
from big_pretrain.train.loop import train_stage
from helpers.tiny_config import one_device, one_device_trainer, tiny_mae_config


def _config(**overrides):
  return tiny_mae_config(**{'total_steps': 4, **overrides})


@pytest.fixture(scope='module')
def finished_workdir(tmp_path_factory):
  """A finished tiny MAE stage: checkpoints at steps 1, 2 and 4, config.json."""
  workdir = tmp_path_factory.mktemp('finished')
  train_stage(_config(), str(workdir), devices=one_device())
  return workdir


@pytest.fixture
def workdir(finished_workdir, tmp_path):
  """A copy of the finished stage that a test may change."""
  copy = tmp_path / 'run'
  shutil.copytree(finished_workdir, copy)
  return copy


@pytest.mark.parametrize('overrides, expected_line', [
    ({'optim.lr_per_256': 2e-3, 'seed': 1}, 'optim.lr_per_256: 0.001 -> 0.002'),
    ({'batch_size': 32}, 'batch_size: 16 -> 32'),
    ({'data.source_image_size': 48}, 'data.source_image_size: 32 -> 48'),
    ({'objective.mask_ratio': 0.5}, 'objective.mask_ratio: 0.75 -> 0.5'),
    ({'model.variant': 'Ti/8'}, 'model.variant: "mu/8" -> "Ti/8"'),  # refused before the shapes
])
@pytest.mark.integration
def test_a_change_to_what_the_state_means_is_refused_and_config_json_kept(
    workdir, overrides, expected_line):
  recorded = (workdir / 'config.json').read_bytes()
  with pytest.raises(ConfigError) as refusal:
    train_stage(_config(total_steps=6, **overrides), str(workdir), devices=one_device())
  message = str(refusal.value)
  assert expected_line in message
  assert '--config.resume_with_changes=True' in message and 'new --workdir' in message
  assert 'total_steps' not in message  # an allowed change is not part of the refusal
  assert (workdir / 'config.json').read_bytes() == recorded


# config.json as an export into the stage folder would have written it (timm's).
_TIMM_CONFIG = {'architecture': 'vit_base_patch16_224', 'num_classes': 0,
                'model_args': {'img_size': 32, 'patch_size': 8}}


@pytest.mark.parametrize('damage', ['model', 'objective', 'seed', 'batch_size',
                                    'written over by an export'])
@pytest.mark.integration
def test_a_config_json_that_lost_keys_is_damage_refused_before_resuming_or_skipping(
    workdir, damage):
  """A record that lost its model, objective, seed or batch size would resume with any values
  if its missing keys were taken for schema changes: it is refused in one line, as damage,
  whether the stage would resume or be skipped as finished; nothing changes."""
  recorded = json.loads((workdir / 'config.json').read_text())
  if damage in recorded:
    del recorded[damage]
  else:
    recorded = _TIMM_CONFIG
  (workdir / 'config.json').write_text(json.dumps(recorded))
  before = sorted(p.relative_to(workdir) for p in workdir.rglob('*'))
  for total_steps in (6, 4):  # resume to 6; the finished 4-step stage
    with pytest.raises(DamagedFileError, match=r'config\.json lacks keys that every config '
                       r'written by its version .* holds: ') as refusal:
      chain.run(_config(total_steps=total_steps), str(workdir), devices=one_device())
    message = str(refusal.value)
    assert '\n' not in message and str(workdir / 'config.json') in message
    assert (damage if damage in _config() else 'model.variant') in message
  assert (workdir / 'config.json').read_text() == json.dumps(recorded)
  assert sorted(p.relative_to(workdir) for p in workdir.rglob('*')) == before


@pytest.mark.integration
def test_allowed_and_permitted_changes_resume_and_are_recorded(workdir, caplog):
  config = _config(total_steps=6, resume_with_changes=True,
                   **{'optim.lr_per_256': 2e-3, 'log.every_steps': 1})
  with caplog.at_level(logging.INFO):
    result = train_stage(config, str(workdir), devices=one_device())
  assert result.finished and result.steps_run == 2  # from step 4
  assert 'resume_with_changes=True allows:\n  optim.lr_per_256: 0.001 -> 0.002' in caplog.text
  assert 'Resuming with changed keys:' in caplog.text and 'total_steps: 4 -> 6' in caplog.text
  history = [json.loads(line) for line in
             (workdir / resume_identity.HISTORY_FILE).read_text().splitlines()]
  assert [entry['step'] for entry in history] == [0, 4]
  assert {entry['schema_version'] for entry in history} == {SCHEMA_VERSION}
  assert history[1]['changes']['optim.lr_per_256'] == [1e-3, 2e-3]
  assert history[1]['changes']['log.every_steps'] == [2, 1]
  recorded = json.loads((workdir / 'config.json').read_text())
  assert recorded['optim']['lr_per_256'] == 2e-3 and recorded['total_steps'] == 6


def test_compare_configs_splits_allowed_from_identity_keys():
  old = json.loads(_config().to_json_best_effort())
  new = json.loads(_config(**{'mesh.fsdp': 2, 'checkpoint.keep': 1, 'model.remat': 'full',
                              'data.seed': 3}).to_json_best_effort())
  del old['objective']['mask_ratio']  # a key the record lacks: a newer schema's, allowed
  del new['optim']['clip_grad_norm']  # a key the new config lacks: a removed one, allowed
  changes = resume_identity.compare_configs(old, new)
  assert changes.identity == {'data.seed': (0, 3)}
  assert set(changes.allowed) == {'mesh.fsdp', 'checkpoint.keep', 'model.remat',
                                  'objective.mask_ratio', 'optim.clip_grad_norm'}


@pytest.mark.integration
def test_missing_metadata_or_arrays_fall_back_to_the_previous_readable_step(workdir, caplog):
  config = _config()
  trainer = one_device_trainer(config)
  (workdir / 'checkpoints' / '4' / 'state' / '_METADATA').unlink()
  for array_file in (workdir / 'checkpoints' / '2' / 'state').rglob('d/*'):
    array_file.unlink()
  checkpointer = Checkpointer(str(workdir / 'checkpoints'), config.checkpoint)
  with caplog.at_level(logging.WARNING):
    step, _ = checkpointer.restore_latest_readable(trainer.abstract_state)
  checkpointer.close()
  assert step == 1
  assert 'Checkpoint step 4' in caplog.text and '4/state/_METADATA is missing' in caplog.text
  assert 'Checkpoint step 2' in caplog.text and '2/state' in caplog.text
  # Set aside, not deleted.
  assert sorted(p.name.split('-')[0] for p in (workdir / 'corrupt_checkpoints').iterdir()) == [
      '2', '4']


@pytest.mark.integration
def test_a_readable_checkpoint_of_another_model_does_not_fit_and_nothing_moves(workdir):
  config = _config(**{'model.variant': 'Ti/8'})
  trainer = one_device_trainer(config)
  checkpointer = Checkpointer(str(workdir / 'checkpoints'), config.checkpoint)
  with pytest.raises(CheckpointMismatchError, match='does not fit the model'):
    checkpointer.restore_latest_readable(trainer.abstract_state)
  checkpointer.close()
  assert not (workdir / 'corrupt_checkpoints').exists()


@pytest.mark.integration
def test_a_stage_whose_final_checkpoint_is_unreadable_is_not_finished(workdir, caplog):
  assert chain._stage_finished(_config(), str(workdir))
  (workdir / 'checkpoints' / '4' / 'state' / '_METADATA').unlink()
  with caplog.at_level(logging.WARNING):
    assert not chain._stage_finished(_config(), str(workdir))
    # A later stage initialized from it takes the latest readable step.
    assert init_from_lib.resolve_checkpoint_dir(str(workdir)) == str(workdir / 'checkpoints' / '2')
  assert 'final checkpoint cannot be read' in caplog.text
  assert 'Skipping checkpoint step 4' in caplog.text and '_METADATA is missing' in caplog.text


@pytest.mark.integration
def test_a_workdir_whose_checkpoints_are_gone_says_so_and_starts_at_step_0(workdir, caplog):
  shutil.rmtree(workdir / 'checkpoints')
  with caplog.at_level(logging.INFO):
    result = train_stage(_config(), str(workdir), devices=one_device())
  assert result.steps_run == 4
  assert 'no checkpoint: if it saved any, they are gone' in caplog.text
  assert f'No checkpoint in {workdir / "checkpoints"}; starting at step 0.' in caplog.text
