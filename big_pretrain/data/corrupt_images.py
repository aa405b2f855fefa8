"""Skipping examples whose image cannot be decoded: counted, logged, and stopped when endless.

The per-example maps (example_maps.py) turn an unreadable image into a
transforms.SkippedExample; the training reader (batch_columns.py) drops those and
replaces each by the next example of its own column, and `SkipReport` counts them,
names the first few in the log, and stops a source that yields no readable image for
`max_consecutive` in a row. The counts are part of the saved data position, so a
resumed run reports the same ones.
"""

from __future__ import annotations

from absl import logging
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


def describe_source(data_config: ml_collections.ConfigDict) -> str:
  """Where a pipeline reads, for messages: "config.data.path='/data/train' (image_folder)"."""
  split = data_config.split
  if data_config.source == 'tfds':
    return f'TFDS {data_config.tfds_name!r} ({split} split)'
  key = 'test_path' if split == 'test' else 'path'
  return f'config.data.{key}={data_config[key]!r} ({data_config.source})'


class SkipReport:
  """Names in the log, and stops on, the examples one process's reader skips.

  The reader (batch_columns.py), which counts them, calls `skipped` for each example it
  drops, in the order it reads them, with its totals so far, and `read_one` for each it
  keeps: "in a row" means consecutive in this
  process's reads. The run of unreadable images is not part of the saved position (a
  resumed run starts a new one), so at most about twice the limit are read before the error.
  """

  def __init__(self, max_consecutive: int, source_description: str):
    self._images, self._records = 0, 0  # the reader's totals at the last skip
    self._max_consecutive = max_consecutive
    self._source_description = source_description
    self._skipped_in_a_row: list[transforms.SkippedExample] = []
    self._skipped_by_this_report = 0  # what the log has named so far counts from here

  def read_one(self) -> None:
    self._skipped_in_a_row.clear()

  def restart(self) -> None:
    """A new run of unreadable images starts (after a restore)."""
    self._skipped_in_a_row.clear()

  def skipped(self, element: transforms.SkippedExample, images: int, records: int) -> None:
    """Logs `element` (the reader's `images` and `records` skipped so far include it);
    UnreadableDataError after max_consecutive in a row."""
    self._images, self._records = images, records
    self._skipped_by_this_report += 1
    self._log_skip(element)
    self._skipped_in_a_row.append(element)
    if len(self._skipped_in_a_row) >= self._max_consecutive:
      raise UnreadableDataError(self._no_readable_image_message())

  def _log_skip(self, element: transforms.SkippedExample) -> None:
    skipped = self._skipped_by_this_report
    if skipped <= SKIPS_NAMED_ONE_BY_ONE:
      last_named = (f' Further skips are summarised every {SKIP_SUMMARY_EVERY}.'
                    if skipped == SKIPS_NAMED_ONE_BY_ONE else '')
      if element.damaged_record:
        logging.warning('Skipping damaged record at %s (%s). %d damaged records skipped so '
                        'far.%s', element.path, element.reason, self._records,
                        last_named)
      else:
        logging.warning('Skipping unreadable image %s (%s). %d skipped so far.%s',
                        element.path, element.reason, self._images, last_named)
    elif skipped % SKIP_SUMMARY_EVERY == 0:
      logging.warning('%d unreadable images skipped so far; the latest: %s (%s).',
                      self._images, element.path, element.reason)

  def _no_readable_image_message(self) -> str:
    # Distinct files: a small folder repeats within the run.
    paths = list(dict.fromkeys(skipped.path for skipped in self._skipped_in_a_row))
    return (
        f'No readable image in the last {len(self._skipped_in_a_row)} read from '
        f'{self._source_description}; {self._images} unreadable images and '
        f'{self._records} damaged records in all, e.g. '
        f'{", ".join(paths[:3])} (the last: {self._skipped_in_a_row[-1].reason}). Check that '
        'the source holds images (JPEG, PNG, ...) that are not damaged, or raise '
        f'config.data.max_consecutive_unreadable (now {self._max_consecutive}) to read past '
        'a longer stretch of broken ones.')
