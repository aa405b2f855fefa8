"""The examples a vocabulary build command reads: its source flags, and the texts they pick.

The texts are read one at a time (`iter_source_texts`), never gathered into a list, so a
command's memory does not grow with the number of examples. The picked examples can be
split into contiguous ranges (`text_ranges`) that a Beam pipeline reads in parallel: each
worker builds the source itself from `SourceFlags` (sources need not pickle; their flags do).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Iterator

import numpy as np

from big_pretrain.data.data_config import default_data_config
from big_pretrain.data import sources
from big_pretrain.data.sources import synthetic
from big_pretrain.errors import UsageError

# Examples read in one piece: the selection's indices are computed for this many at a time.
_CHUNK = 65_536


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags that pick the examples a build command reads."""
  parser.add_argument('--source', required=True, choices=sources.SOURCES.names())
  parser.add_argument('--path', help='image_folder: the folder of class subfolders (captions'
                      ' are .txt files beside the images). array_record: the folder written by'
                      ' `python -m big_pretrain.data.convert`, or a glob of its shards.')
  parser.add_argument(
      '--num_examples', type=int, default=None,
      help=f'synthetic: how many examples to read (default: {synthetic.DEFAULT_NUM_EXAMPLES}).'
      ' Other sources: read only N examples, evenly spaced over the source so every'
      ' class is represented (default: all).')
  # Synthetic texts are drawn before anything that depends on the image size,
  # so the smallest images give the same texts, fastest.
  parser.add_argument('--source_image_size', type=int, default=16,
                      help='synthetic: size of the generated images (does not change the texts).')
  parser.add_argument('--seed', type=int, default=0, help='synthetic: the dataset seed.')
  parser.add_argument('--tfds_name', help='tfds: the dataset, prepared in ArrayRecord format.')
  parser.add_argument('--tfds_data_dir', help="tfds: where it is prepared (default: TFDS's).")
  parser.add_argument('--tfds_split', default='train', help='tfds: the split to read.')
  parser.add_argument('--tfds_caption_key', help='tfds: the text feature holding captions.')


@dataclasses.dataclass(frozen=True)
class SourceFlags:
  """What builds the source and picks its examples: plain values, so it pickles to workers."""

  source: str
  data: dict[str, Any]  # the keys of config.data that build the source
  num_examples: int | None  # read only this many, evenly spaced (None: all)


def source_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SourceFlags:
  """The `add_source_arguments` flags, checked (a mistake: parser.error)."""
  path_holds = sources.SOURCES[args.source].path_holds
  if path_holds and not args.path:
    parser.error(f'--source={args.source} needs --path: {path_holds}.')
  if args.source == 'tfds' and not (args.tfds_name and args.tfds_caption_key):
    parser.error('--source=tfds needs --tfds_name (a dataset prepared in ArrayRecord format)'
                 ' and --tfds_caption_key (its text feature).')
  if args.num_examples is not None and args.num_examples < 1:
    parser.error(f'--num_examples must be positive, got {args.num_examples}.')
  synthetic_examples = (args.num_examples if args.source == 'synthetic' and args.num_examples
                        else synthetic.DEFAULT_NUM_EXAMPLES)
  return SourceFlags(
      source=args.source, num_examples=args.num_examples,
      data=dict(source=args.source, path=args.path, seed=args.seed, split='train',
                num_examples=synthetic_examples, source_image_size=args.source_image_size,
                tfds_name=args.tfds_name, tfds_data_dir=args.tfds_data_dir,
                tfds_train_split=args.tfds_split, tfds_caption_key=args.tfds_caption_key))


def open_source(flags: SourceFlags) -> sources.Source:
  """The source the flags name; one that cannot be read is a UsageError naming the flags."""
  data = default_data_config()
  data.update(**flags.data)
  try:
    return sources.build_source(data)
  except (OSError, ValueError) as error:  # worded for main.py's keys: say this command's flags
    raise UsageError(_in_flags(str(error))) from error


def num_selected(flags: SourceFlags, source: sources.Source) -> int:
  """How many examples the flags pick from `source`."""
  return len(source) if flags.num_examples is None else min(flags.num_examples, len(source))


def selected_indices(source_length: int, num_examples: int | None, start: int,
                     stop: int) -> np.ndarray:
  """The source indices of picks [start, stop): all of them, or `num_examples` evenly spaced.

  The evenly spaced picks are ``np.linspace(0, source_length - 1, num_examples).astype(int)``
  (computed here for the range only, as linspace computes each value; np.unique, which the
  picks once went through, changes nothing: fewer picks than examples are > 1 apart).
  """
  if num_examples is None or num_examples >= source_length:
    return np.arange(start, stop)
  if num_examples == 1:
    return np.zeros(stop - start, int)
  values = np.arange(start, stop, dtype=np.float64)
  values *= np.float64(source_length - 1) / np.float64(num_examples - 1)
  if stop == num_examples and stop > start:
    values[-1] = source_length - 1  # linspace's endpoint is exact
  return values.astype(int)


def text_ranges(total: int, parts: int = 64, max_size: int = 50_000) -> list[tuple[int, int]]:
  """[start, stop) ranges of picks 0..total: `parts` of them (more when a part would exceed
  `max_size`), contiguous and in order, so each can be read on its own."""
  size = max(1, min(max_size, math.ceil(total / parts)))
  return [(start, min(start + size, total)) for start in range(0, total, size)]


class TextReader:
  """Reads the texts of ranges of picks; builds its source on the first read, so a copy
  pickled to a Beam worker builds it there, once."""

  def __init__(self, flags: SourceFlags):
    self._flags = flags
    self._source = None

  def __getstate__(self) -> dict[str, Any]:
    return {'_flags': self._flags, '_source': None}

  @property
  def source(self) -> sources.Source:
    if self._source is None:
      self._source = open_source(self._flags)
    return self._source

  def num_selected(self) -> int:
    return num_selected(self._flags, self.source)

  def read(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(source index, {'hashtags': [...], 'caption': '...'}) of picks [start, stop)."""
    source = self.source
    stop = self.num_selected() if stop is None else stop
    # A source that can give its texts without its image (synthetic) is asked for them only.
    texts_of = getattr(source, 'texts', source.__getitem__)
    for chunk_start in range(start, stop, _CHUNK):
      for index in selected_indices(len(source), self._flags.num_examples, chunk_start,
                                    min(chunk_start + _CHUNK, stop)):
        example = texts_of(int(index))
        yield int(index), {'hashtags': list(example.get('hashtags') or ()),
                           'caption': example.get('caption') or ''}


def iter_source_texts(args: argparse.Namespace, parser: argparse.ArgumentParser
                      ) -> Iterator[dict[str, Any]]:
  """The 'hashtags' and 'caption' of the examples picked by `add_source_arguments` flags, one
  at a time. The flags are checked, and the source built, at the call."""
  reader = TextReader(source_flags(args, parser))
  reader.source  # pylint: disable=pointless-statement  (an unreadable source fails here)
  return (text for _, text in reader.read())


# The data config's keys that build_source's messages name, and this command's flags for them.
_FLAGS_FOR_KEYS = {'config.data.tfds_train_split': '--tfds_split'} | {
    f'config.data.{key}': f'--{key}'
    for key in ('path', 'tfds_name', 'tfds_data_dir', 'tfds_caption_key', 'source')}


def _in_flags(message: str) -> str:
  for key, flag in _FLAGS_FOR_KEYS.items():
    message = message.replace(key, flag)
  return message
