"""This process's rows of every global batch, read so that any number of processes reads
the same batches, and the data position that any number of processes can resume.

A global batch of G rows is G *columns*. Column r reads its own slice of the (shuffled,
repeated, augmented) example stream, the elements r, r + G, r + 2G, ... in order, and each
global batch takes from every column the next element that reads. Process i of P owns
the columns [i*L, (i+1)*L), L = G / P. With nothing skipped, column r of batch b is
element b*G + r: the layout `process_share.ProcessShare` gives every process's rows.

An unreadable image (or a damaged record) is replaced by the next element of its own
column, never by another column's, so which example lands in which row of which batch
depends on the global stream alone, not on how many processes read it. The data
position is therefore global and small: the number of batches taken, and each column
that skipped something with how many (`GlobalPosition`). A checkpoint written by P
processes resumes on any P' that divides the same global batch: every process takes
its own columns' positions from it.

Reading runs ahead in `num_threads` threads, a few elements per column, in column
order within each batch (the order Grain's reader would take).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
from typing import Any, Callable

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from big_pretrain.data import corrupt_images
from big_pretrain.data import transforms
from big_pretrain.errors import CheckpointMismatchError

# The checkpoint item's format (`GlobalPosition.to_json`); a later change of meaning bumps it.
POSITION_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class ColumnLayout:
  """Which columns of a global batch of `global_batch_size` rows process `process_index`
  of `process_count` reads."""
  global_batch_size: int
  process_index: int
  process_count: int

  @property
  def rows(self) -> int:
    return self.global_batch_size // self.process_count

  @property
  def first_column(self) -> int:
    return self.process_index * self.rows

  def element(self, row: int, position: int) -> int:
    """The stream index of the `position`-th element of this process's `row`'s column."""
    return position * self.global_batch_size + self.first_column + row


@dataclasses.dataclass
class GlobalPosition:
  """Where every column of the training stream is: what a checkpoint saves.

  `batches`: global batches taken; `skipped`: {column: (unreadable images, damaged
  records)} for each column that skipped any. Column c's next element is at position
  batches + images + records of its slice. Identical on every process.
  """
  global_batch_size: int
  batches: int
  skipped: dict[int, tuple[int, int]]

  @property
  def corrupt_images_skipped(self) -> int:
    return sum(images for images, _ in self.skipped.values())

  @property
  def corrupt_records_skipped(self) -> int:
    return sum(records for _, records in self.skipped.values())

  def to_json(self) -> dict[str, Any]:
    return {'format': POSITION_FORMAT, 'global_batch_size': self.global_batch_size,
            'batches': self.batches,
            'skipped': {str(column): list(counts)
                        for column, counts in sorted(self.skipped.items())},
            # Totals, for people reading the file; the columns are what restores.
            'corrupt_images_skipped': self.corrupt_images_skipped,
            'corrupt_records_skipped': self.corrupt_records_skipped}

  @classmethod
  def merged(cls, global_batch_size: int, process_states: list[dict[str, Any]]
             ) -> GlobalPosition:
    """The position of every process's `BatchColumnReader.get_state()`, in process order."""
    batches = {int(state['batches']) for state in process_states}
    if len(batches) != 1:
      raise RuntimeError(f'The processes have taken different numbers of batches '
                         f'({sorted(batches)}); this is a bug in big_pretrain.')
    skipped = {int(column): (int(counts[0]), int(counts[1]))
               for state in process_states for column, counts in state['skipped'].items()}
    return cls(global_batch_size, batches.pop(), skipped)

  @classmethod
  def from_json(cls, saved: dict[str, Any]) -> GlobalPosition:
    """Raises ValueError, naming the key, for a record that is not one."""
    if saved.get('format') != POSITION_FORMAT:
      raise ValueError(f'data position format {saved.get("format")!r} is not '
                       f'{POSITION_FORMAT}, the one this version reads')
    try:
      skipped = {int(column): (int(counts[0]), int(counts[1]))
                 for column, counts in saved['skipped'].items()}
      return cls(int(saved['global_batch_size']), int(saved['batches']), skipped)
    except (KeyError, TypeError, ValueError, IndexError) as error:
      raise ValueError(f'the data position record is incomplete or malformed '
                       f'({type(error).__name__}: {error})') from error


class BatchColumnReader:
  """Iterates over this process's per-process batches (numpy), column by column.

  `dataset[index]` is the stream's element `index` (a transforms.SkippedExample for one
  that does not read); `to_row` maps a readable element to the row the batch holds.
  `get_state` / `set_state` speak this process's position (what DevicePrefetch copies
  after every batch); `global_position` gathers every process's into the one a checkpoint
  saves, and `set_state` takes that too.
  """

  def __init__(self, dataset: grain.MapDataset, layout: ColumnLayout, *,
               to_row: Callable[[Any], dict[str, np.ndarray]], num_threads: int,
               elements_ahead: int, report: corrupt_images.SkipReport,
               example_keys_file: str | None = None):
    self._dataset = dataset
    self._layout = layout
    self._to_row = to_row
    self._report = report
    self._batches = 0
    self._images = np.zeros(layout.rows, np.int64)   # skipped per column of this process
    self._records = np.zeros(layout.rows, np.int64)
    # Per column: futures of the next elements, and the next position to submit.
    self._depth = max(1, -(-elements_ahead // layout.rows))
    self._ahead: list[collections.deque] = [collections.deque() for _ in range(layout.rows)]
    self._next_submitted = np.zeros(layout.rows, np.int64)
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=num_threads, thread_name_prefix='input_reader')
    self._example_keys_file = example_keys_file

  def __iter__(self) -> BatchColumnReader:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if not any(self._ahead):
      self._read_ahead()
    rows = [self._next_readable(row) for row in range(self._layout.rows)]
    batch = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
    if self._example_keys_file is not None:
      self._write_example_keys(batch['image'])
    self._batches += 1
    return batch

  def _write_example_keys(self, images: np.ndarray) -> None:
    """One JSON line: this batch's index, this process's first column, and each row's key
    (the first 16 hex digits of the SHA-1 of its augmented image). A batch read again
    after a resume is written again: every record of a batch must agree."""
    line = json.dumps({'batch': self._batches, 'first_column': self._layout.first_column,
                       'keys': [hashlib.sha1(image.tobytes()).hexdigest()[:16]
                                for image in images]})
    with open(self._example_keys_file, 'a', encoding='utf-8') as f:
      f.write(line + '\n')

  def _position(self, row: int) -> int:
    return self._batches + int(self._images[row] + self._records[row])

  def _read_ahead(self) -> None:
    """Starts reading `depth` elements of every column, column by column per batch."""
    for row in range(self._layout.rows):
      self._next_submitted[row] = self._position(row)
    for _ in range(self._depth):
      for row in range(self._layout.rows):
        self._submit(row)

  def _submit(self, row: int) -> None:
    index = self._layout.element(row, int(self._next_submitted[row]))
    self._ahead[row].append(self._executor.submit(self._dataset.__getitem__, index))
    self._next_submitted[row] += 1

  def _next_readable(self, row: int) -> dict[str, np.ndarray]:
    while True:
      element = self._ahead[row].popleft().result()
      self._submit(row)
      if not isinstance(element, transforms.SkippedExample):
        self._report.read_one()
        return self._to_row(element)
      if element.damaged_record:
        self._records[row] += 1
      else:
        self._images[row] += 1
      # Raises after too many in a row.
      self._report.skipped(element, self.images_skipped, self.records_skipped)

  @property
  def images_skipped(self) -> int:
    """Unreadable images skipped so far in this process's columns."""
    return int(self._images.sum())

  @property
  def records_skipped(self) -> int:
    """Damaged records skipped so far in this process's columns."""
    return int(self._records.sum())

  def _drop_read_ahead(self) -> None:
    for ahead in self._ahead:
      for future in ahead:
        future.cancel()
      ahead.clear()

  def close(self) -> None:
    """Stops the reader threads; elements being read are dropped."""
    self._drop_read_ahead()
    self._executor.shutdown(wait=True, cancel_futures=True)

  # --- The position.

  def get_state(self) -> dict[str, Any]:
    """This process's position: batches taken, and its columns that skipped anything."""
    first = self._layout.first_column
    return {'batches': self._batches,
            'skipped': {str(first + row): [int(self._images[row]), int(self._records[row])]
                        for row in np.flatnonzero(self._images + self._records)}}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a position of `get_state`, a `GlobalPosition.to_json()` (any process
    count), or a per-process Grain state of a checkpoint written before global positions
    (only by this process count: the checkpointer checks)."""
    if 'parent' in state:
      state = self._from_per_process_state(state)
    elif 'format' in state:  # a checkpoint's record: checked, then each takes its columns
      saved = GlobalPosition.from_json(state)
      if saved.global_batch_size != self._layout.global_batch_size:
        raise CheckpointMismatchError(
            f'The data position was saved for global batches of {saved.global_batch_size} '
            f'rows; this run has {self._layout.global_batch_size}. A run resumes on any '
            'number of processes, but only with the same global batch size: the batches '
            'would differ. Start a new --workdir to train with another batch size.')
    first, rows = self._layout.first_column, self._layout.rows
    self._drop_read_ahead()
    self._batches = int(state['batches'])
    self._images[:] = 0
    self._records[:] = 0
    for column, (images, records) in state['skipped'].items():
      if first <= int(column) < first + rows:
        self._images[int(column) - first] = images
        self._records[int(column) - first] = records
    self._report.restart()

  def _from_per_process_state(self, state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint from before global positions held this process's count of elements
    read of its rows in order, `next_index`, with the skips among them: each of its
    columns has read every element before that, so their positions follow exactly. Which
    column each skip was in was not recorded: the totals are attributed in column order."""
    read = int(state['parent']['next_index'])
    images_left = int(state['corrupt_images_skipped'])
    records_left = int(state.get('corrupt_records_skipped', 0))
    rows = self._layout.rows
    batches = (read - images_left - records_left) // rows
    skipped = {}
    for row in range(rows):
      extra = (read - row + rows - 1) // rows - batches  # this column's elements read
      images = min(extra, images_left)
      records = extra - images
      images_left, records_left = images_left - images, records_left - records
      if extra:
        skipped[str(self._layout.first_column + row)] = [images, records]
    return {'batches': batches, 'skipped': skipped}

  def global_position(self, state: dict[str, Any] | None = None) -> GlobalPosition:
    """Every process's `state` (default: its current one) gathered into one position.

    A collective: every process calls it at the same step."""
    state = self.get_state() if state is None else state
    layout = self._layout
    first = layout.first_column
    local = np.zeros((2, layout.rows), np.int32)
    for column, (images, records) in state['skipped'].items():
      local[:, int(column) - first] = (images, records)
    words = np.concatenate([[state['batches']], local.ravel()]).astype(np.int32)
    if jax.process_count() > 1:
      words = np.asarray(multihost_utils.process_allgather(words))
      first_columns = [process * layout.rows for process in range(jax.process_count())]
    else:
      first_columns = [first]
    gathered = words.reshape(-1, 1 + 2 * layout.rows)
    states = [{'batches': int(row[0]),
               'skipped': {str(first + column): [int(images), int(records)]
                           for column, (images, records) in enumerate(
                               zip(row[1:1 + layout.rows], row[1 + layout.rows:]))
                           if images or records}}
              for first, row in zip(first_columns, gathered)]
    return GlobalPosition.merged(layout.global_batch_size, states)
