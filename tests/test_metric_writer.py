"""The metric writer (big_pretrain/train/metric_writer.py): events that TensorBoard's own reader
reads back (scalars, images, hparams), the console line, process 0 only, errors surfaced."""

import logging
import os

import numpy as np
import pytest

from big_pretrain.train import metric_writer
from big_pretrain.train.metric_writer import MetricWriter
from helpers.events import read_events


def test_scalars_images_and_hparams_read_back_with_tensorboards_reader(tmp_path, caplog):
  writer = MetricWriter(str(tmp_path), write_events=True)
  writer.write_hparams({'model': {'variant': 'B/16', 'scan': True}, 'optim': {'lr': 1e-3},
                        'total_steps': 10, 'data': {'path': None, 'crop': (0.2, 1.0)}})
  with caplog.at_level(logging.INFO):
    writer.write_scalars(5, {'loss': np.float32(0.25), 'steps': 7})
    writer.write_scalars(10, {'loss': 0.125, 'steps': 8})
    grid = np.linspace(0, 1, 4 * 6 * 3, dtype=np.float32).reshape(1, 4, 6, 3)
    writer.write_images(10, {'reconstruction/input_masked': grid,
                             'gray': np.full((2, 3, 2, 1), 7, np.uint8)})
    writer.close()
  assert '[5] loss=0.25, steps=7' in caplog.text and '[10] loss=0.125, steps=8' in caplog.text
  events = read_events(tmp_path)
  assert events['scalars'] == {'loss': [(5, 0.25), (10, 0.125)], 'steps': [(5, 7.0), (10, 8.0)]}
  [(step, [image])] = events['images']['reconstruction/input_masked']
  # Floats in [0, 1] are stored as round(255 x): PNG is lossless.
  assert step == 10
  np.testing.assert_array_equal(image, (grid[0] * 255).round().astype(np.uint8))
  [(_, gray)] = events['images']['gray']
  assert len(gray) == 2 and np.all(gray[1] == 7) and gray[1].shape == (3, 2)
  assert events['hparams'] == {'model.variant': 'B/16', 'model.scan': True, 'optim.lr': 1e-3,
                               'total_steps': 10.0, 'data.path': 'None',
                               'data.crop': '(0.2, 1.0)'}


def test_other_processes_only_log_and_a_failed_write_is_raised(tmp_path, caplog):
  logdir = tmp_path / 'process_1'
  writer = MetricWriter(str(logdir), write_events=False)
  with caplog.at_level(logging.INFO):
    writer.write_scalars(3, {'loss': 1.5})
    writer.write_hparams({'a': 1})
    writer.flush()
  assert '[3] loss=1.5' in caplog.text and not logdir.exists()
  writer.write_scalars(4, {'loss': np.ones(2)})  # not a scalar: fails in the writer's thread
  with pytest.raises(ValueError, match='one value, got shape'):
    writer.close()


def test_a_full_disk_at_close_is_a_warning_not_an_error_that_hides_the_runs_own(
    tmp_path, monkeypatch, caplog):
  # The loop closes the writer also when a checkpoint save failed on the same full disk:
  # that CheckpointSaveError, not the events file's OSError, must reach the user.
  writer = MetricWriter(str(tmp_path), write_events=True)
  writer.write_scalars(1, {'loss': 1.0})

  def disk_full():
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(metric_writer.EventFile, 'flush', lambda self: disk_full())
  with caplog.at_level(logging.WARNING):
    writer.close()
  assert 'could not be written' in caplog.text and 'No space left' in caplog.text


def test_a_bucket_workdir_gets_the_whole_event_file_at_each_flush(tmp_path, monkeypatch):
  bucket = tmp_path / 'bucket'
  bucket.mkdir()

  class FakeBucketPath:  # etils.epath over gs://: here a local folder stands for the bucket
    def __init__(self, url):
      assert url.startswith('gs://b/run/')
      self.local = bucket / url[len('gs://b/run/'):]

    def write_bytes(self, data):
      self.local.write_bytes(data)

  monkeypatch.setattr(metric_writer.epath, 'Path', FakeBucketPath)
  writer = MetricWriter('gs://b/run', write_events=True)
  writer.write_scalars(1, {'loss': 2.0})
  writer.flush()
  assert read_events(bucket)['scalars'] == {'loss': [(1, 2.0)]}
  writer.write_scalars(2, {'loss': 1.0})
  writer.close()
  assert read_events(bucket)['scalars'] == {'loss': [(1, 2.0), (2, 1.0)]}
  assert len(os.listdir(bucket)) == 1  # the same file, replaced whole
