"""Global batches put on the devices ahead of the step that takes them.

A background thread batches the next examples and copies them to the devices
while the current step runs, so neither the host's batching (stacking a
per-process batch of images) nor the host-to-device copy waits in the loop.

Prefetching runs the reader ahead of training, so its own position is not the
position to checkpoint. ``DevicePrefetch.position`` is: it holds the reader's
state just after the last batch the loop *took*, so a checkpoint resumes at the
first batch no step has seen, exactly as without prefetching.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Callable

import numpy as np

# How long a blocked put or get waits before checking whether to stop (seconds).
_POLL_SECONDS = 0.1


class _Prefetched:
  """One queue item: a batch and the Grain state after it, or the error that ended the stream."""

  def __init__(self, batch=None, state_after=None, error: BaseException | None = None):
    self.batch = batch
    self.state_after = state_after
    self.error = error


class DevicePrefetch:
  """Iterates over `to_device(next(local_batches))`, `size` batches ahead, in a thread.

  `local_batches` iterates over this process's numpy batches and has a position
  (`get_state`, `set_state`, `global_position`: batch_columns.BatchColumnReader); only
  the background thread touches it while prefetching. Errors raised while reading
  (a missing file, a corrupt shard) are re-raised by `__next__` in order, after
  the batches before them. Checkpoint `position`, not `local_batches`.
  """

  def __init__(self, local_batches,
               to_device: Callable[[dict[str, np.ndarray]], dict[str, Any]], size: int):
    if size < 1:
      raise ValueError(f'DevicePrefetch needs size >= 1 (got {size}); use the pipeline '
                       'directly for no prefetching.')
    self._local_batches = local_batches
    self._to_device = to_device
    self._size = size
    self._queue: queue.Queue[_Prefetched] | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    # The Grain state after the last batch taken (or where the thread started):
    # what a checkpoint must resume from. None while the thread is stopped.
    self._state_after_taken = None
    self._finished = False
    self.position = _Position(self)

  def __iter__(self) -> DevicePrefetch:
    return self

  def __next__(self) -> dict[str, Any]:
    if self._finished:
      raise StopIteration
    self.start()
    item = self._take()
    if item.error is not None:
      self._finished = True
      raise item.error
    self._state_after_taken = item.state_after
    return item.batch

  def _take(self) -> _Prefetched:
    while True:
      try:
        return self._queue.get(timeout=_POLL_SECONDS)
      except queue.Empty:
        if self._thread.is_alive():
          continue
      try:  # It may have put its last item just before ending.
        return self._queue.get_nowait()
      except queue.Empty:
        raise RuntimeError('The device prefetch thread ended without a batch or an '
                           'error; this is a bug in big_pretrain.') from None

  def start(self) -> None:
    """Starts the background thread, if it is not running (`__next__` starts it too)."""
    if self._thread is not None:
      return
    self._stop.clear()
    self._finished = False
    self._state_after_taken = copy.deepcopy(self._local_batches.get_state())
    self._queue = queue.Queue(maxsize=self._size)
    self._thread = threading.Thread(target=self._fill, name='device_prefetch', daemon=True)
    self._thread.start()

  def close(self) -> None:
    """Stops the background thread and rewinds to the first batch not taken.

    Batches prefetched and not taken are dropped; a later `__next__` reads
    them again.
    """
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._local_batches.set_state(self._state_after_taken)
    self._thread, self._queue, self._state_after_taken = None, None, None

  def state(self):
    """The Grain state to resume from: just after the last batch taken."""
    if self._state_after_taken is not None:
      return self._state_after_taken
    return copy.deepcopy(self._local_batches.get_state())

  def global_position(self):
    """`local_batches.global_position` of the state after the last batch taken."""
    return self._local_batches.global_position(self.state())

  def restore(self, state) -> None:
    """Continues from `state` (from `state()`, or a checkpoint of the position)."""
    self.close()
    self._local_batches.set_state(state)
    self._finished = False

  def __enter__(self) -> DevicePrefetch:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _fill(self) -> None:
    while not self._stop.is_set():
      try:
        local_batch = next(self._local_batches)
        # A copy: the state must not change with the iterator's later steps.
        item = _Prefetched(self._to_device(local_batch),
                           copy.deepcopy(self._local_batches.get_state()))
      except BaseException as error:  # noqa: BLE001 - handed to the loop's thread, in order.
        item = _Prefetched(error=error)
      if not self._put(item) or item.error is not None:
        return

  def _put(self, item: _Prefetched) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=_POLL_SECONDS)
        return True
      except queue.Full:
        continue
    return False


class _Position:
  """The data position to checkpoint: where the next batch the loop takes starts.

  The same protocol as the reader's own (batch_columns.BatchColumnReader): `get_state` /
  `set_state` of this process, `global_position` gathered from every process.
  """

  def __init__(self, prefetch: DevicePrefetch):
    self._prefetch = prefetch

  def get_state(self):
    return copy.deepcopy(self._prefetch.state())

  def set_state(self, state) -> None:
    self._prefetch.restore(state)

  def global_position(self):
    """Every process's position after its last batch taken, gathered (a collective)."""
    return self._prefetch.global_position()
