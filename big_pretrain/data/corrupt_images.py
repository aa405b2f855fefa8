"""Skipping examples whose image cannot be decoded: counted, logged, and stopped when endless.

The per-example maps (example_maps.py) turn an unreadable image into a
transforms.SkippedExample; `SkipCorruptExamplesIterDataset` drops those after
Grain's reader threads, counts them in the iterator state (so a resumed run
reports the same count), names the first few in the log, and stops a source
that yields no readable image for `max_consecutive` in a row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import grain
import ml_collections

from big_pretrain.data import transforms
from big_pretrain.errors import UnreadableDataError

# config.data.max_consecutive_unreadable's default: several large batches of nothing but
# unreadable images is a broken source, not bad luck.
DEFAULT_MAX_CONSECUTIVE_UNREADABLE = 1000
# Skipped images named one warning each; after that, one summary line every SKIP_SUMMARY_EVERY,
# so a partly broken dataset does not flood the log.
SKIPS_NAMED_ONE_BY_ONE = 10
SKIP_SUMMARY_EVERY = 1000


@dataclasses.dataclass
class SkippedExampleCounter:
  """How many examples were skipped; owned by one pipeline, saved in its iterator state:
  `count` images that do not decode, `records` records damaged in their file."""
  count: int = 0
  records: int = 0


def describe_source(data_config: ml_collections.ConfigDict) -> str:
  """Where a pipeline reads, for messages: "config.data.path='/data/train' (image_folder)"."""
  split = data_config.split
  if data_config.source == 'tfds':
    return f'TFDS {data_config.tfds_name!r} ({split} split)'
  key = 'test_path' if split == 'test' else 'path'
  return f'config.data.{key}={data_config[key]!r} ({data_config.source})'


class _SkipCorruptExamplesDatasetIterator(grain.DatasetIterator):
  """Drops SkippedExample markers, counting each; stops a source that yields no image.

  Runs in the process's main thread, after Grain's reader threads, and sees
  examples in the pipeline's order: "in a row" means consecutive in this
  process's share of the stream. The run of unreadable images is not part of
  the saved state (a resumed run starts a new one), so at most about twice
  the limit are read before the error.
  """

  def __init__(self, parent: grain.DatasetIterator, counter: SkippedExampleCounter,
               max_consecutive: int, source_description: str):
    super().__init__(parent)
    self._counter = counter
    self._max_consecutive = max_consecutive
    self._source_description = source_description
    self._skipped_in_a_row: list[transforms.SkippedExample] = []
    self._skipped_by_this_iterator = 0  # what the log has named so far counts from here

  def __next__(self):
    while True:
      element = next(self._parent)
      if not isinstance(element, transforms.SkippedExample):
        self._skipped_in_a_row.clear()
        return element
      if element.damaged_record:
        self._counter.records += 1
      else:
        self._counter.count += 1
      self._skipped_by_this_iterator += 1
      self._log_skip(element)
      self._skipped_in_a_row.append(element)
      if len(self._skipped_in_a_row) >= self._max_consecutive:
        raise UnreadableDataError(self._no_readable_image_message())

  def _log_skip(self, element: transforms.SkippedExample) -> None:
    skipped = self._skipped_by_this_iterator
    if skipped <= SKIPS_NAMED_ONE_BY_ONE:
      last_named = (f' Further skips are summarised every {SKIP_SUMMARY_EVERY}.'
                    if skipped == SKIPS_NAMED_ONE_BY_ONE else '')
      if element.damaged_record:
        logging.warning('Skipping damaged record at %s (%s). %d damaged records skipped so '
                        'far.%s', element.path, element.reason, self._counter.records,
                        last_named)
      else:
        logging.warning('Skipping unreadable image %s (%s). %d skipped so far.%s',
                        element.path, element.reason, self._counter.count, last_named)
    elif skipped % SKIP_SUMMARY_EVERY == 0:
      logging.warning('%d unreadable images skipped so far; the latest: %s (%s).',
                      self._counter.count, element.path, element.reason)

  def _no_readable_image_message(self) -> str:
    # Distinct files: a small folder repeats within the run.
    paths = list(dict.fromkeys(skipped.path for skipped in self._skipped_in_a_row))
    return (
        f'No readable image in the last {len(self._skipped_in_a_row)} read from '
        f'{self._source_description}; {self._counter.count} unreadable images and '
        f'{self._counter.records} damaged records in all, e.g. '
        f'{", ".join(paths[:3])} (the last: {self._skipped_in_a_row[-1].reason}). Check that '
        'the source holds images (JPEG, PNG, ...) that are not damaged, or raise '
        f'config.data.max_consecutive_unreadable (now {self._max_consecutive}) to read past '
        'a longer stretch of broken ones.')

  def get_state(self) -> dict[str, Any]:
    return {'parent': self._parent.get_state(),
            'corrupt_images_skipped': self._counter.count,
            'corrupt_records_skipped': self._counter.records}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._counter.count = int(state['corrupt_images_skipped'])
    self._counter.records = int(state.get('corrupt_records_skipped', 0))  # saved before: none
    self._skipped_in_a_row.clear()

  def __str__(self) -> str:
    return 'SkipCorruptExamplesDatasetIterator'


class SkipCorruptExamplesIterDataset(grain.IterDataset):
  """Drops examples the pipeline marked as SkippedExample; counts them in ``counter``.

  The count is part of the iterator state, so a restored run reports the same
  count as the run that saved it. ``max_consecutive`` unreadable examples in a
  row raise UnreadableDataError naming some of them and ``source_description``.
  """

  def __init__(self, parent: grain.IterDataset, counter: SkippedExampleCounter, *,
               max_consecutive: int = DEFAULT_MAX_CONSECUTIVE_UNREADABLE,
               source_description: str = 'the source'):
    super().__init__(parent)
    self._counter = counter
    self._max_consecutive = max_consecutive
    self._source_description = source_description

  def __iter__(self) -> grain.DatasetIterator:
    return _SkipCorruptExamplesDatasetIterator(self._parent.__iter__(), self._counter,
                                               self._max_consecutive, self._source_description)

  def __str__(self) -> str:
    return 'SkipCorruptExamplesIterDataset'
