"""Faults a long run meets: a preemption notice, a loss that turns NaN, a damaged checkpoint."""

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from big_pretrain.config.defaults import SCHEMA_VERSION
from big_pretrain.errors import (CheckpointSaveError, CheckpointUnreadableError, NonFiniteLossError,
                                 Preempted)
from big_pretrain.evaluators import evaluator_config
from big_pretrain.evaluators.reconstruction import ReconstructionEvaluator
from big_pretrain.storage import checkpoints as checkpoint_lib
from big_pretrain.storage import stage_dir
from big_pretrain.storage.checkpoints import Checkpointer
from big_pretrain.storage.stage_dir import StageDir
from big_pretrain.train import faults
from big_pretrain.train import loop
from big_pretrain.train import remat_choice
from big_pretrain.train.loop import train_stage
from helpers import checkpoint_damage
from helpers.paths import REPO_ROOT, TINY_CONFIG_FILE
from helpers.tiny_config import one_device, tiny_mae_config
from helpers.trees import assert_trees_equal


def _params(result):
  return jax.tree.map(np.asarray, jax.device_get(result.state.params))


def _fault_config(**overrides):
  return tiny_mae_config(total_steps=8, **overrides)


@pytest.fixture(scope='module')
def uninterrupted_params(tmp_path_factory):
  return _params(train_stage(_fault_config(), str(tmp_path_factory.mktemp('uninterrupted')),
                             devices=one_device()))


@pytest.fixture(scope='module')
def stopped_at_step_6(tmp_path_factory):
  """The fault config's stage stopped at step 6 of 8 (checkpoints 2, 4 and 6), trained once:
  each test damages a copy (`_copy_of`)."""
  workdir = tmp_path_factory.mktemp('stopped_at_6')
  train_stage(_fault_config(), str(workdir), stop_after_steps=6, devices=one_device())
  return workdir


@pytest.fixture(scope='module')
def finished_at_step_8(tmp_path_factory):
  """The fault config's stage finished (checkpoints 4, 6 and 8), trained once."""
  workdir = tmp_path_factory.mktemp('finished_at_8')
  train_stage(_fault_config(), str(workdir), devices=one_device())
  return workdir


def _copy_of(workdir, tmp_path):
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  return copy


@pytest.mark.integration
def test_sigterm_saves_the_current_step_and_the_same_call_resumes_exactly(
    tmp_path, monkeypatch, uninterrupted_params):
  reached = faults.PreemptionNotice.reached

  def sigterm_at_step_3(self, step):
    if step == 3:  # A real signal, through the real handler, in the middle of a run.
      os.kill(os.getpid(), signal.SIGTERM)
    return reached(self, step)

  monkeypatch.setattr(faults.PreemptionNotice, 'reached', sigterm_at_step_3)
  first = train_stage(_fault_config(), str(tmp_path), devices=one_device())
  assert first.preempted and not first.finished
  assert first.steps_run == 3
  # Step 3 is off the every-2-steps interval: saved because of the notice.
  assert Checkpointer(str(tmp_path / 'checkpoints'), _fault_config().checkpoint).latest_step() == 3
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # our handler is gone again

  monkeypatch.setattr(faults.PreemptionNotice, 'reached', reached)
  resumed = train_stage(_fault_config(), str(tmp_path), devices=one_device())
  assert resumed.finished and resumed.steps_run == 5
  assert_trees_equal(_params(resumed), uninterrupted_params)


@pytest.mark.integration
def test_a_preempted_step_saves_without_evaluating_and_the_rerun_runs_the_final_ones(
    tmp_path, monkeypatch):
  # A preempted host has seconds left: the checkpoint, not the evaluations, must make it.
  config = tiny_mae_config(total_steps=4)
  config.evals.reconstruction = evaluator_config('reconstruction', num_images=8, every_steps=2)
  evaluated = []
  real_run = ReconstructionEvaluator.run

  def counted_run(self, params, step):
    evaluated.append(step)
    return real_run(self, params, step)

  monkeypatch.setattr(ReconstructionEvaluator, 'run', counted_run)
  reached = faults.PreemptionNotice.reached
  monkeypatch.setattr(faults.PreemptionNotice, 'reached', lambda self, step: step == 4)
  first = train_stage(config, str(tmp_path), devices=one_device())
  assert first.preempted and first.steps_run == 4
  assert evaluated == [2]  # the final step 4 was saved, not evaluated
  assert not stage_dir.final_evaluations_recorded(StageDir(str(tmp_path)), True, 4)

  monkeypatch.setattr(faults.PreemptionNotice, 'reached', reached)
  rerun = train_stage(config, str(tmp_path), devices=one_device())
  assert rerun.steps_run == 0 and evaluated == [2, 4]
  assert stage_dir.final_evaluations_recorded(StageDir(str(tmp_path)), True, 4)


_POISON_LABEL = -7


def _poison_steps(monkeypatch, steps):
  """Makes the loss (and so the gradients) NaN at the given 1-based steps of the next run."""
  build_objective = remat_choice.build_objective  # what the loop builds its objective with

  def poisoned_objective(config):
    objective = build_objective(config)
    clean_loss = objective.loss

    def loss(params, batch, rng, train):
      value, metrics = clean_loss(params, batch, rng, train)
      poisoned = jnp.all(batch['label'] == _POISON_LABEL)
      return value * jnp.where(poisoned, jnp.nan, 1.0), metrics

    objective.loss = loss
    return objective

  class PoisonedPipeline(loop.InputPipeline):
    calls = 0

    def to_global_arrays(self, local_batch):  # once per batch, in order, prefetched or not
      batch = super().to_global_arrays(local_batch)
      PoisonedPipeline.calls += 1
      if PoisonedPipeline.calls in steps:
        batch = dict(batch, label=jax.device_put(
            np.full(batch['label'].shape, _POISON_LABEL, np.int32), batch['label'].sharding))
      return batch

  monkeypatch.setattr(remat_choice, 'build_objective', poisoned_objective)
  monkeypatch.setattr(loop, 'InputPipeline', PoisonedPipeline)


@pytest.mark.integration
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  _poison_steps(monkeypatch, {5})
  config = _fault_config()
  config.log.every_steps = 4  # The NaN shows first at the save check of step 6.
  with pytest.raises(NonFiniteLossError, match=r'became nan .* at step 5.* step 4 in'):
    train_stage(config, str(tmp_path), devices=one_device())
  checkpointer = Checkpointer(str(tmp_path / 'checkpoints'), config.checkpoint)
  assert checkpointer.all_steps() == [1, 2, 4]  # Orbax also keeps a new run's first step.
  monkeypatch.undo()
  # The checkpoint left behind is whole and finite, and training goes on from it.
  resumed = train_stage(config, str(tmp_path), devices=one_device())
  assert resumed.finished and resumed.steps_run == 4
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(_params(resumed)))


@pytest.mark.integration
def test_skip_nonfinite_updates_skips_a_bad_step_and_goes_on(tmp_path, monkeypatch):
  _poison_steps(monkeypatch, {3})
  config = _fault_config(**{'optim.skip_nonfinite_updates': 1})
  result = train_stage(config, str(tmp_path), devices=one_device())
  assert result.finished
  assert result.last_metrics['nonfinite_updates_skipped'] == 1
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(_params(result)))


@pytest.mark.integration
def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, caplog, uninterrupted_params, stopped_at_step_6):
  config = _fault_config()
  tmp_path = _copy_of(stopped_at_step_6, tmp_path)
  latest = tmp_path / 'checkpoints' / '6'
  largest = max((p for p in latest.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  with open(largest, 'r+b') as f:
    f.truncate(largest.stat().st_size // 2)

  with caplog.at_level(logging.WARNING):
    resumed = train_stage(config, str(tmp_path), devices=one_device())
  assert 'Checkpoint step 6' in caplog.text and 'cannot be read' in caplog.text
  assert resumed.steps_run == 4  # from step 4
  # Set aside, not deleted.
  [kept] = (tmp_path / 'corrupt_checkpoints').iterdir()
  assert kept.name.startswith('6-')
  assert_trees_equal(_params(resumed), uninterrupted_params)


def test_a_second_ctrl_c_stops_at_once():
  # Python's own handler before, whatever an earlier test in this worker left (a test
  # worker may start with SIGINT ignored): the notice must put back what it found.
  found = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with faults.PreemptionNotice() as notice:
      os.kill(os.getpid(), signal.SIGINT)  # the first: save at the next step boundary, stop
      assert notice.reached(1)
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, found)


@pytest.mark.integration
def test_ctrl_c_saves_and_main_exits_75_to_be_rerun(tmp_path):
  # The whole program, as a user runs it, with a real SIGINT once training has started.
  workdir = tmp_path / 'run'
  # One device: Orbax's per-replica slicing of each saved array costs seconds on 8.
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1',
             XLA_FLAGS='--xla_backend_optimization_level=0')
  process = subprocess.Popen(
      [sys.executable, 'main.py', f'--config={TINY_CONFIG_FILE}', f'--workdir={workdir}',
       '--config.total_steps=100000', '--config.checkpoint.every_steps=100000'],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first_checkpoint = workdir / 'checkpoints' / '1'  # Orbax keeps a new run's first step
  deadline = time.monotonic() + 240
  while not first_checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.2)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 75, stderr[-3000:]
  assert stderr.strip().splitlines()[-1].startswith('main.py: Preempted: ')
  assert 'Traceback' not in stderr
  saved = Checkpointer(str(workdir / 'checkpoints'), _fault_config().checkpoint).all_steps()
  assert saved[0] == 1 and len(saved) == 2  # and the step it stopped at


# Seconds after 'Model FLOPs per step' is logged: the initialization is being compiled
# (here for ~1 s after it), or on a faster machine the first steps run. None: at once
# when the run lock is taken, while starting up.
@pytest.mark.parametrize('seconds_after_flops_line', [None, 0.0, 0.4, 0.8, 1.2])
@pytest.mark.integration
def test_sigterm_while_starting_up_exits_75_in_one_line_and_releases_the_workdir(
    tmp_path, seconds_after_flops_line):
  # Schedulers send SIGTERM whenever they preempt, also while a run starts or compiles
  # (XLA's compiler threads, still running, must not crash the exit).
  workdir = tmp_path / 'run'
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1',
             XLA_FLAGS='--xla_backend_optimization_level=0')
  process = subprocess.Popen(
      [sys.executable, 'main.py', f'--config={TINY_CONFIG_FILE}', f'--workdir={workdir}'],
      cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  stderr_lines = []
  if seconds_after_flops_line is None:
    deadline = time.monotonic() + 120
    while (not (workdir / 'run.lock').exists() and process.poll() is None
           and time.monotonic() < deadline):
      time.sleep(0.05)
  else:
    for line in process.stderr:
      stderr_lines.append(line)
      if 'Model FLOPs per step' in line:
        break
    time.sleep(seconds_after_flops_line)
  process.send_signal(signal.SIGTERM)
  stderr = ''.join(stderr_lines) + process.communicate(timeout=120)[1]
  assert process.returncode == 75, stderr[-3000:]
  last_line = stderr.strip().splitlines()[-1]
  if seconds_after_flops_line is None:
    assert last_line.startswith("main.py: Preempted: SIGTERM before a stage's next step")
    assert not (workdir / 'checkpoints').exists() or not os.listdir(workdir / 'checkpoints')
  else:  # before the first step, or saved at a step
    assert re.match(r"main.py: Preempted: (SIGTERM before a stage's next step|Stage 'main' "
                    r'saved a checkpoint at step \d+)', last_line), stderr[-3000:]
  assert 'Traceback' not in stderr and not (workdir / 'run.lock').exists()


def test_a_sigterm_whose_exception_a_library_swallowed_still_stops_the_next_stage():
  # The handler outside training raises wherever the main thread is; where that is a
  # finaliser, Python drops the exception: the training loop's notice raises it again.
  outside_training = faults.SigtermOutsideTraining()
  previous = signal.signal(signal.SIGTERM, outside_training)
  try:
    with pytest.raises(Preempted, match="SIGTERM before a stage's next step"):
      outside_training(signal.SIGTERM, None)
    with pytest.raises(Preempted, match="SIGTERM before a stage's next step"):
      with faults.PreemptionNotice():
        pass
    assert signal.getsignal(signal.SIGTERM) is outside_training  # nothing left installed
  finally:
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.integration
def test_a_failed_save_stops_the_run_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
  save = ocp.CheckpointManager.save

  def disk_full_at_step_4(manager, step, *args, **kwargs):
    if step == 4:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return save(manager, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', disk_full_at_step_4)
  config = _fault_config()
  with pytest.raises(CheckpointSaveError,
                     match=r'step 4 .*No space left on device.*\(steps 1, 2\) are intact'):
    train_stage(config, str(tmp_path), devices=one_device())
  monkeypatch.undo()
  # From step 2, which reads back whole.
  resumed = train_stage(config, str(tmp_path), devices=one_device())
  assert resumed.finished and resumed.steps_run == 6


def test_a_save_failure_raised_again_on_close_is_a_save_error(tmp_path, monkeypatch):
  """Orbax's close waits for the step's metadata write and raises its error again (the disk
  filled meanwhile): a CheckpointSaveError, one line, not an OSError's traceback."""
  checkpointer = Checkpointer(str(tmp_path / 'checkpoints'), _fault_config().checkpoint)
  real_close = ocp.CheckpointManager.close

  def close_after_a_failed_metadata_write(manager):
    real_close(manager)
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(ocp.CheckpointManager, 'close', close_after_a_failed_metadata_write)
  with pytest.raises(CheckpointSaveError, match=r'No space left on device.*stopping') as error:
    checkpointer.close()
  assert '\n' not in str(error.value)


@pytest.mark.integration
def test_an_asynchronous_saves_failure_names_its_own_step(tmp_path, monkeypatch):
  # Orbax raises a background save's error when the next save starts: the message
  # names the step that was lost (2), not the one being started (4).
  save = ocp.CheckpointManager.save

  def step_2_fails_in_the_background(manager, step, *args, **kwargs):
    if step == 2:
      return True  # started, and then nothing reaches the disk
    if step == 4:
      raise ValueError('RESOURCE_EXHAUSTED: Failed writing: No space left on device')
    return save(manager, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', step_2_fails_in_the_background)
  with pytest.raises(CheckpointSaveError,
                     match=r'checkpoint of step 2 .*No space left.*\(step 1\) are intact'):
    train_stage(_fault_config(), str(tmp_path), devices=one_device())


@pytest.mark.integration
def test_a_save_that_cannot_fit_is_refused_before_orbax_writes_anything(tmp_path, monkeypatch):
  # Orbax's writer threads print their own tracebacks when the disk fills mid-save: a save
  # bigger than the free space is refused first, in one message.
  real_disk_usage = checkpoint_lib.shutil.disk_usage
  saves = []

  def full_after_step_2(path):
    usage = real_disk_usage(path)
    return usage._replace(free=0) if len(saves) >= 2 else usage

  real_save = ocp.CheckpointManager.save

  def counted_save(manager, step, *args, **kwargs):
    saves.append(step)
    return real_save(manager, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint_lib.shutil, 'disk_usage', full_after_step_2)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', counted_save)
  with pytest.raises(CheckpointSaveError,
                     match=r'step 4 .*No space left on device: the checkpoint needs about '
                           r'.*MiB free.*\(steps 1, 2\) are intact'):
    train_stage(_fault_config(), str(tmp_path), devices=one_device())
  assert saves == [1, 2]  # step 4 never reached Orbax
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']


@pytest.mark.parametrize('damage', ['one flipped bit', 'overwritten bytes'])
@pytest.mark.integration
def test_altered_array_bytes_are_found_set_aside_and_the_previous_step_resumed_exactly(
    tmp_path, caplog, uninterrupted_params, stopped_at_step_6, damage):
  """Bytes of the latest checkpoint's array data changed after it was written (a disk or
  bucket fault): the read succeeds, the digest does not match; that step is set aside and
  the run continues from the previous one, ending bit-identical to a run never damaged."""
  config = _fault_config()
  tmp_path = _copy_of(stopped_at_step_6, tmp_path)
  checkpoint_damage.damage_where_it_still_reads(tmp_path / 'checkpoints' / '6', damage)

  with caplog.at_level(logging.WARNING):
    resumed = train_stage(config, str(tmp_path), devices=one_device())
  assert 'does not match the digest it was saved with' in caplog.text, caplog.text
  assert resumed.steps_run == 4  # from step 4
  [kept] = (tmp_path / 'corrupt_checkpoints').iterdir()
  assert kept.name.startswith('6-')
  assert_trees_equal(_params(resumed), uninterrupted_params)


# A leaf of the tiny MAE whose bytes the tests alter.
_ALTERED = 'params/encoder/transformer/block_1/mlp/fc1/kernel'


@pytest.mark.parametrize('record', checkpoint_damage.DIGESTS_DAMAGE)
@pytest.mark.integration
def test_a_digests_record_deleted_emptied_or_incomplete_is_damage_and_set_aside(
    tmp_path, caplog, uninterrupted_params, stopped_at_step_6, record):
  """Deleting or emptying the digests (or the record of one array) does not switch the check
  off: the latest step, with a flipped bit, is set aside and the run resumes exactly from
  the previous one."""
  config = _fault_config()
  tmp_path = _copy_of(stopped_at_step_6, tmp_path)
  latest = tmp_path / 'checkpoints' / '6'
  checkpoint_damage.alter_one_value(latest, _ALTERED)
  checkpoint_damage.damage_digests(latest, record, _ALTERED)
  with caplog.at_level(logging.WARNING):
    resumed = train_stage(config, str(tmp_path), devices=one_device())
  expected = {'deleted': "digests.json is missing, although its _CHECKPOINT_METADATA lists a "
                         "'digests' item",
              'emptied': 'digests.json records no array digests',
              'missing the altered array': f'have no record of the array {_ALTERED}'}[record]
  assert expected in caplog.text and 'counts as damaged' in caplog.text, caplog.text
  assert 'cannot be verified.' not in caplog.text  # the warning is for steps before digests
  assert resumed.steps_run == 4  # from step 4
  [kept] = (tmp_path / 'corrupt_checkpoints').iterdir()
  assert kept.name.startswith('6-')
  assert_trees_equal(_params(resumed), uninterrupted_params)


@pytest.mark.integration
def test_a_data_position_edited_or_its_digest_deleted_is_damage_and_set_aside(
    tmp_path, caplog, uninterrupted_params, stopped_at_step_6):
  """The data position is one record for every process, with its digest: editing it (one
  batch on: step 6) or deleting its digest (step 4) makes the step damaged, never a resume
  at another place in the data (a step without the record fails to restore, as any item).
  Both are set aside and the run resumes exactly from step 2."""
  tmp_path = _copy_of(stopped_at_step_6, tmp_path)
  position_file = tmp_path / 'checkpoints' / '6' / 'data_position' / 'data_position.json'
  position = json.loads(position_file.read_text())
  position['batches'] += 1
  position_file.write_text(json.dumps(position))
  record_file = tmp_path / 'checkpoints' / '4' / 'digests' / 'digests.json'
  record = json.loads(record_file.read_text())
  del record['data_position']
  record_file.write_text(json.dumps(record))
  with caplog.at_level(logging.WARNING):
    resumed = train_stage(_fault_config(), str(tmp_path), devices=one_device())
  assert caplog.text.count('the data position of') == 2, caplog.text
  assert resumed.steps_run == 6  # from step 2
  assert sorted(p.name.split('-')[0] for p in (tmp_path / 'corrupt_checkpoints').iterdir()) == [
      '4', '6']
  assert_trees_equal(_params(resumed), uninterrupted_params)


@pytest.mark.integration
def test_only_steps_written_before_digests_restore_with_one_warning(
    tmp_path, caplog, uninterrupted_params, stopped_at_step_6):
  """Checkpoints of a version before digests (none in the step, none named in its Orbax
  metadata, a config of schema version 2) still load, saying once they cannot be verified."""
  config = _fault_config()
  tmp_path = _copy_of(stopped_at_step_6, tmp_path)
  for step_dir in (tmp_path / 'checkpoints').iterdir():
    checkpoint_damage.as_if_written_before_digests(step_dir)
  recorded = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**recorded, 'schema_version': 2}))
  with caplog.at_level(logging.WARNING):
    resumed = train_stage(config, str(tmp_path), devices=one_device())
  assert caplog.text.count('cannot be verified') == 1
  assert ('was written without digests, by a version of big_pretrain before them (its '
          "_CHECKPOINT_METADATA lists no 'digests' item)") in caplog.text
  assert resumed.steps_run == 2
  assert_trees_equal(_params(resumed), uninterrupted_params)


@pytest.mark.integration
def test_where_a_step_shows_its_digests_were_written(tmp_path, stopped_at_step_6):
  """The step's own Orbax metadata decides where it reads; else a step beside it with
  digests, or the stage's config.json of schema version 3 on."""
  tmp_path = _copy_of(stopped_at_step_6, tmp_path)
  steps = tmp_path / 'checkpoints'
  assert checkpoint_lib.digests_written(str(steps / '6'))[0]
  checkpoint_damage.as_if_written_before_digests(steps / '6')
  assert not checkpoint_lib.digests_written(str(steps / '6'))[0]
  (steps / '6' / '_CHECKPOINT_METADATA').unlink()
  assert checkpoint_lib.digests_written(str(steps / '6')) == (
      True, 'step 2 beside it has digests')
  for step in ('2', '4'):
    shutil.rmtree(steps / step)
  assert checkpoint_lib.digests_written(str(steps / '6')) == (
      True, "its stage's config.json was written by a version that saves digests "
      f'(schema_version {SCHEMA_VERSION})')
  recorded = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**recorded, 'schema_version': 2}))
  assert not checkpoint_lib.digests_written(str(steps / '6'))[0]


@pytest.mark.integration
def test_when_every_checkpoint_is_damaged_the_stage_stops_in_one_line(tmp_path):
  config = _fault_config(**{'checkpoint.keep': 1})
  train_stage(config, str(tmp_path), stop_after_steps=6, devices=one_device())
  [only] = (tmp_path / 'checkpoints').iterdir()
  checkpoint_damage.damage_where_it_still_reads(only, 'one flipped bit')
  with pytest.raises(CheckpointUnreadableError, match=r'No checkpoint in .* is intact: step 6 '
                     r'did not read back whole') as error:
    train_stage(config, str(tmp_path), devices=one_device())
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('record', ('whole',) + checkpoint_damage.DIGESTS_DAMAGE)
@pytest.mark.integration
def test_init_from_and_export_skip_a_damaged_step_for_the_previous_intact_one(
    tmp_path, caplog, finished_at_step_8, record):
  """A reader of another stage's checkpoints (init_from, the export) checks every array it
  reads, against a record that must be whole; a damaged newest step is skipped, and left
  where it is."""
  from big_pretrain import export  # pylint: disable=import-outside-toplevel
  from big_pretrain.stages import init_from as init_from_lib  # pylint: disable=import-outside-toplevel
  tmp_path = _copy_of(finished_at_step_8, tmp_path)  # steps 4, 6, 8 kept
  checkpoints = tmp_path / 'checkpoints'
  intact = init_from_lib.read_subtrees(str(checkpoints / '6'), ('encoder',))
  checkpoint_damage.alter_one_value(checkpoints / '8', _ALTERED)
  if record != 'whole':
    checkpoint_damage.damage_digests(checkpoints / '8', record, _ALTERED)
  with pytest.raises(CheckpointUnreadableError, match=re.escape(str(checkpoints / '8'))):
    init_from_lib.read_subtrees(str(checkpoints / '8'), ('encoder', 'decoder'))
  with caplog.at_level(logging.WARNING):
    step_dir, subtrees = init_from_lib.read_intact_subtrees(str(tmp_path), ('encoder', 'decoder'))
    exported_from, params = export.read_params(str(tmp_path), ['encoder'], None)
  assert step_dir.endswith('/6') and exported_from.endswith('/6')
  assert f'Skipping checkpoint {checkpoints / "8"}' in caplog.text
  assert_trees_equal(subtrees['encoder'], intact['encoder'])
  assert_trees_equal(params['encoder'], intact['encoder'])
  assert (checkpoints / '8').exists()  # a reader moves nothing
