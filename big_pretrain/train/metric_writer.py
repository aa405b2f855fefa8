"""The training metrics' writer: a console line on every process, TensorBoard events on process 0.

TensorBoard's event files are TFRecord files of `Event` protobufs; the
`tensorboard` package declares both and frames the records, so no TensorFlow
is needed (clu's writers import it: 1.3 GB in every process). What is written
is what TensorBoard's dashboards read:

  scalars   tensor summaries with the 'scalars' plugin's metadata (what
            tf.summary.scalar writes)
  images    the 'images' plugin's [width, height, png, ...] string tensors
            (what tf.summary.image writes)
  hparams   the stage's config, flattened, for the HParams dashboard

Writes run in order in one background thread (turning device arrays into
numbers, PNG encoding, file I/O), so the training loop does not wait for them;
an error there is raised at the next `flush` or `close`. A workdir in a bucket
(gs://...) is written through etils.epath: the events are kept in a local file
and the whole file is copied to the bucket at each flush, as TF's own writer
does for object stores, where a file cannot be appended to.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import pathlib
import socket
import tempfile
import time
from typing import Any, Mapping

import numpy as np
from absl import logging
from etils import epath
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

from big_pretrain.storage.files import is_bucket

EVENT_FILE_PREFIX = 'events.out.tfevents'


def console_line(step: int, scalars: Mapping[str, Any]) -> str:
  """'[step] name=value, ...', names sorted, floats to 6 significant digits."""
  values = [f'{name}={value:.6g}' if isinstance(value, float) else f'{name}={value}'
            for name, value in sorted(scalars.items())]
  return f'[{step}] {", ".join(values)}'


def scalar_summary(tag: str, value: float) -> summary_pb2.Summary:
  return summary_pb2.Summary(value=[summary_pb2.Summary.Value(
      tag=tag, tensor=tensor_util.make_tensor_proto(np.float32(value)),
      metadata=scalar_metadata.create_summary_metadata(display_name=tag, description=''))])


def image_summary(tag: str, images: np.ndarray) -> summary_pb2.Summary:
  """`images`: (N, H, W, C) uint8, or floats in [0, 1]; C is 1, 3 or 4."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'Image summary {tag!r} wants (N, H, W, C) images, got shape {images.shape}.')
  if images.dtype != np.uint8:
    images = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
  encoded = []
  for image in images:
    png = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, format='PNG')
    encoded.append(png.getvalue())
  height, width = images.shape[1:3]
  tensor = tensor_util.make_tensor_proto(
      np.array([str(width).encode(), str(height).encode(), *encoded], dtype=object))
  return summary_pb2.Summary(value=[summary_pb2.Summary.Value(
      tag=tag, tensor=tensor, metadata=image_metadata.create_summary_metadata(
          display_name=tag, description=''))])


def hparams_summary_of(hparams: Mapping[str, Any]) -> summary_pb2.Summary:
  """The HParams dashboard's record of a nested mapping (a config's `to_dict()`), its keys
  joined by dots; values that are not bool, int, float or str become their text."""
  flat = {}

  def add(prefix: str, value: Any) -> None:
    if isinstance(value, Mapping):
      for key, inner in value.items():
        add(f'{prefix}.{key}' if prefix else str(key), inner)
    else:
      flat[prefix] = value if isinstance(value, (bool, int, float, str)) else str(value)

  add('', hparams)
  return hparams_summary.hparams_pb(flat)


class EventFile:
  """One TensorBoard event file in `logdir` (a folder or a bucket URL), written in order."""

  def __init__(self, logdir: str):
    name = (f'{EVENT_FILE_PREFIX}.{int(time.time()):010d}.{socket.gethostname()}.'
            f'{os.getpid()}.big_pretrain')
    self.path = f'{logdir}/{name}' if is_bucket(logdir) else os.path.join(logdir, name)
    if is_bucket(logdir):
      self._local = tempfile.NamedTemporaryFile(prefix=EVENT_FILE_PREFIX, delete=False)
      self._records = RecordWriter(self._local)
    else:
      os.makedirs(logdir, exist_ok=True)
      self._local = None
      self._records = RecordWriter(open(self.path, 'ab'))  # pylint: disable=consider-using-with
    # The first record names the format, as every TensorBoard writer's does.
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def add_summary(self, step: int, summary: summary_pb2.Summary) -> None:
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def _write(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())

  def flush(self) -> None:
    self._records.flush()
    if self._local is not None:
      epath.Path(self.path).write_bytes(pathlib.Path(self._local.name).read_bytes())

  def close(self) -> None:
    self.flush()
    self._records.close()
    if self._local is not None:
      os.unlink(self._local.name)


class MetricWriter:
  """Scalars, images and hparams of a stage: logged on every process, written as TensorBoard
  events in `logdir` by process 0 only (`write_events`), flushed at least every
  `flush_seconds` while written to, so that TensorBoard shows a run as it trains."""

  def __init__(self, logdir: str, *, write_events: bool, flush_seconds: float = 30.0):
    self._events = EventFile(logdir) if write_events else None
    self._flush_seconds = flush_seconds
    self._last_flush = time.monotonic()
    # One thread: writes stay in the order they were asked for.
    self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='metric_writer')
    self._pending: list[concurrent.futures.Future] = []

  def _submit(self, write, *args) -> None:
    """Queues `write(*args)`; raises the error of an earlier write that failed."""
    still_pending = []
    for future in self._pending:
      if future.done():
        future.result()
      else:
        still_pending.append(future)
    still_pending.append(self._thread.submit(self._write_and_flush_if_due, write, *args))
    self._pending = still_pending

  def _write_and_flush_if_due(self, write, *args) -> None:
    write(*args)
    if self._events is not None and time.monotonic() - self._last_flush > self._flush_seconds:
      self._events.flush()
      self._last_flush = time.monotonic()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._submit(self._write_scalars, step, dict(scalars))

  def _write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    scalars = {name: _number(value) for name, value in scalars.items()}
    logging.info('%s', console_line(step, scalars))
    if self._events is not None:
      for name, value in scalars.items():
        self._events.add_summary(step, scalar_summary(name, value))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """`images`: name -> (N, H, W, C), uint8 or floats in [0, 1]."""
    self._submit(self._write_images, step, dict(images))

  def _write_images(self, step: int, images: dict[str, Any]) -> None:
    logging.info('[%d] Images: %s.', step,
                 {name: tuple(np.shape(value)) for name, value in images.items()})
    if self._events is not None:
      for name, value in images.items():
        self._events.add_summary(step, image_summary(name, np.asarray(value)))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    if self._events is not None:
      self._submit(self._events.add_summary, 0, hparams_summary_of(hparams))

  def flush(self) -> None:
    """Waits for every write asked for so far; raises the first one's error."""
    pending, self._pending = self._pending, []
    for future in pending:
      future.result()
    if self._events is not None:
      self._thread.submit(self._events.flush).result()

  def close(self) -> None:
    """Writes what is pending and closes the events file. A write that fails now (a full
    disk) is a warning: the events are a log, and the run's own error must not be hidden."""
    try:
      self.flush()
      if self._events is not None:
        self._thread.submit(self._events.close).result()
    except OSError as error:
      logging.warning('The last TensorBoard events could not be written to %s (%s); the '
                      'checkpoints are not affected.',
                      self._events.path if self._events else 'the workdir', error)
    finally:
      self._thread.shutdown()


def _number(value: Any) -> int | float:
  """A Python number of a scalar (a Python, NumPy or JAX one)."""
  value = np.asarray(value)
  if value.size != 1:
    raise ValueError(f'A scalar metric must hold one value, got shape {value.shape}.')
  return value.item() if value.dtype.kind in 'iub' else float(value)
