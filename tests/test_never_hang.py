"""Bad data and failing evaluators end a run with one clear error, never a hang or a loop.

A folder of only unreadable images stops with an error naming its files, a partly broken
one reads on with a bounded number of warnings, a held-out folder smaller than an
evaluator's batch shows every image once, and an evaluator that fails at the final step
keeps the checkpoint so that a rerun finishes.
"""

import contextlib
import json
import logging
import signal

import numpy as np
from PIL import Image
import pytest

from big_pretrain.data import corrupt_images
from big_pretrain.data import train_input
from big_pretrain.data.device_prefetch import DevicePrefetch
from big_pretrain.errors import UnreadableDataError
from big_pretrain.evaluators import evaluator_config
from big_pretrain.evaluators import reconstruction
from big_pretrain.stages import chain
from big_pretrain.storage import stage_dir
from big_pretrain.storage.checkpoints import Checkpointer
from big_pretrain.train import loop
from helpers.batches import IMAGE_SIZE, first_devices_mesh, small_data_config
from helpers.events import read_events
from helpers.tiny_config import one_device, tiny_mae_config


@contextlib.contextmanager
def time_limit(seconds: int):
  """Raises TimeoutError in the main thread after `seconds`: a loop fails the test, not CI."""

  def on_alarm(signum, frame):
    del signum, frame
    raise TimeoutError(f'still running after {seconds} s')

  previous = signal.signal(signal.SIGALRM, on_alarm)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _image_folder(root, *, readable: int, unreadable: int, classes=('cats', 'dogs')):
  """`readable` PNGs and `unreadable` garbage .jpg files per class subfolder of `root`."""
  rng = np.random.default_rng(0)
  for class_name in classes:
    (root / class_name).mkdir(parents=True)
    for i in range(readable):
      pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / class_name / f'{class_name}{i}.png')
    for i in range(unreadable):
      (root / class_name / f'broken{i}.jpg').write_bytes(rng.bytes(300))
  return root


def _data_config(path, **overrides):
  """small_data_config over the image folder at `path`."""
  return small_data_config(source='image_folder', path=str(path), **overrides)


def _skip_warnings(caplog) -> list[str]:
  return [record.getMessage() for record in caplog.records
          if 'unreadable' in record.getMessage() and record.levelno == logging.WARNING]


# --- A source with no readable image -------------------------------------------

def test_folder_of_only_unreadable_images_stops_naming_files_and_count(tmp_path, caplog):
  folder = _image_folder(tmp_path / 'images', readable=0, unreadable=4)
  data = train_input.InputPipeline(_data_config(folder), global_batch_size=4,
                                   mesh=first_devices_mesh())
  with caplog.at_level(logging.WARNING), time_limit(30):
    with pytest.raises(UnreadableDataError) as error:
      data.next_local_numpy()
  message = str(error.value)
  assert f'last {corrupt_images.DEFAULT_MAX_CONSECUTIVE_UNREADABLE} read' in message
  assert str(folder) in message and 'broken' in message and '.jpg' in message
  assert 'config.data.max_consecutive_unreadable' in message
  # Not one warning per try: the first few, then a summary every SKIP_SUMMARY_EVERY.
  assert len(_skip_warnings(caplog)) <= corrupt_images.SKIPS_NAMED_ONE_BY_ONE + 1


def test_the_limit_is_configurable_and_reaches_the_training_loop_through_prefetch(tmp_path):
  folder = _image_folder(tmp_path / 'images', readable=0, unreadable=2)
  data = train_input.InputPipeline(_data_config(folder, max_consecutive_unreadable=5),
                                global_batch_size=2, mesh=first_devices_mesh())
  # As train_stage reads: batches made in a background thread, errors raised in the loop.
  batches = DevicePrefetch(data.local_batches, data.to_global_arrays, 2)
  try:
    with time_limit(30), pytest.raises(UnreadableDataError, match='last 5 read'):
      next(batches)
  finally:
    batches.close()


def test_partly_broken_folder_reads_on_with_a_bounded_number_of_warnings(tmp_path, caplog):
  folder = _image_folder(tmp_path / 'images', readable=4, unreadable=4)
  data = train_input.InputPipeline(_data_config(folder), global_batch_size=4,
                                   mesh=first_devices_mesh())
  with caplog.at_level(logging.WARNING), time_limit(30):
    batches = [data.next_local_numpy() for _ in range(20)]  # 10 epochs of the 8 good images
  assert all(batch['image'].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) for batch in batches)
  assert data.corrupt_images_skipped >= 70  # about 8 broken files per epoch
  warnings = _skip_warnings(caplog)
  assert len(warnings) == corrupt_images.SKIPS_NAMED_ONE_BY_ONE  # the rest wait for a summary
  assert 'broken' in warnings[0] and 'summarised every' in warnings[-1]


# --- Evaluators at the final step -----------------------------------------------

def _stage_config(**overrides):
  config = tiny_mae_config(total_steps=2, **overrides)
  config.evals.reconstruction = evaluator_config('reconstruction', num_images=8)
  return config


@pytest.mark.integration
def test_held_out_folder_smaller_than_the_reconstruction_batch_shows_every_image(tmp_path):
  train = _image_folder(tmp_path / 'train', readable=8, unreadable=0)
  held_out = _image_folder(tmp_path / 'held_out', readable=7, unreadable=0, classes=('cats',))
  config = _stage_config(**{'data.source': 'image_folder', 'data.path': str(train),
                            'data.test_path': str(held_out)})
  workdir = tmp_path / 'run'
  result = loop.train_stage(config, str(workdir), devices=one_device())
  assert result.finished and 'reconstruction' in result.eval_results
  assert Checkpointer(str(workdir / 'checkpoints'), config.checkpoint).latest_step() == 2
  # One grid row per held-out image, each counted once: 7, not 8 or a crash.
  grid = np.asarray(Image.open(workdir / 'reconstruction.png'))
  assert grid.shape[0] == 7 * (IMAGE_SIZE + 2) - 2
  assert json.loads((workdir / stage_dir.EVAL_RESULTS_FILE).read_text())['step'] == 2
  # TensorBoard reads the stage's scalars, its config and the same grid from its events.
  events = read_events(workdir)
  assert [step for step, _ in events['scalars']['loss']] == [2]  # log.every_steps = 2
  assert events['scalars']['loss'][-1][1] == pytest.approx(result.last_metrics['loss'])
  assert events['hparams']['objective.name'] == 'mae' and events['hparams']['total_steps'] == 2
  [(step, [image])] = events['images']['reconstruction/' + '_'.join(
      loop.objective_class('mae').visualization_panels)]
  assert step == 2
  np.testing.assert_array_equal(image, grid)


@pytest.mark.integration
def test_evaluator_failing_at_the_final_step_keeps_the_checkpoint_and_a_rerun_finishes(
    tmp_path, monkeypatch):
  config = _stage_config()
  workdir = tmp_path / 'run'

  def fail(self, params, step):
    raise RuntimeError('the evaluator broke')

  monkeypatch.setattr(reconstruction.ReconstructionEvaluator, 'run', fail)
  with pytest.raises(RuntimeError, match='the evaluator broke') as error:
    loop.train_stage(config, str(workdir), devices=one_device())
  assert Checkpointer(str(workdir / 'checkpoints'), config.checkpoint).latest_step() == 2
  assert error.type.__name__ == 'FinalEvaluationError'
  assert ("'reconstruction' failed at the final step 2" in str(error.value)
          and 'checkpoint is saved' in str(error.value))
  assert not (workdir / stage_dir.EVAL_RESULTS_FILE).exists()
  assert not chain._stage_finished(config, str(workdir))  # pylint: disable=protected-access

  monkeypatch.undo()  # the cause fixed: the same command runs only the final evaluations
  rerun = loop.train_stage(config, str(workdir), devices=one_device())
  assert rerun.finished and rerun.steps_run == 0
  assert 'reconstruction' in rerun.eval_results
  assert json.loads((workdir / stage_dir.EVAL_RESULTS_FILE).read_text())['step'] == 2
  assert (workdir / 'reconstruction.png').exists()
  assert chain._stage_finished(config, str(workdir))  # pylint: disable=protected-access
