"""The examples a vocabulary build command reads: its source flags, and the texts they pick."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from big_pretrain.data.data_config import default_data_config
from big_pretrain.data import sources
from big_pretrain.data.sources import synthetic
from big_pretrain.errors import UsageError


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags that pick the examples a build command reads."""
  parser.add_argument('--source', required=True, choices=sources.SOURCE_NAMES)
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


def read_source_texts(args: argparse.Namespace,
                      parser: argparse.ArgumentParser) -> list[dict[str, Any]]:
  """The 'hashtags' and 'caption' of the examples picked by `add_source_arguments` flags."""
  if args.source in sources.PATH_SOURCES and not args.path:
    parser.error(f'--source={args.source} needs --path: {sources.PATH_SOURCES[args.source][0]}.')
  if args.source == 'tfds' and not (args.tfds_name and args.tfds_caption_key):
    parser.error('--source=tfds needs --tfds_name (a dataset prepared in ArrayRecord format)'
                 ' and --tfds_caption_key (its text feature).')
  if args.num_examples is not None and args.num_examples < 1:
    parser.error(f'--num_examples must be positive, got {args.num_examples}.')
  synthetic_examples = (args.num_examples if args.source == 'synthetic' and args.num_examples
                        else synthetic.DEFAULT_NUM_EXAMPLES)
  data = default_data_config()
  data.update(source=args.source, path=args.path, seed=args.seed, split='train',
              num_examples=synthetic_examples, source_image_size=args.source_image_size,
              tfds_name=args.tfds_name, tfds_data_dir=args.tfds_data_dir,
              tfds_train_split=args.tfds_split, tfds_caption_key=args.tfds_caption_key)
  try:
    source = sources.build_source(data)
  except (OSError, ValueError) as error:  # worded for main.py's keys: say this command's flags
    raise UsageError(_in_flags(str(error))) from error
  indices = range(len(source))
  if args.num_examples is not None and args.num_examples < len(source):
    indices = np.unique(np.linspace(0, len(source) - 1, args.num_examples).astype(int))
  texts = []
  for index in indices:
    example = source[int(index)]
    texts.append({'hashtags': list(example.get('hashtags') or ()),
                  'caption': example.get('caption') or ''})
  return texts


# The data config's keys that build_source's messages name, and this command's flags for them.
_FLAGS_FOR_KEYS = {'config.data.tfds_train_split': '--tfds_split'} | {
    f'config.data.{key}': f'--{key}'
    for key in ('path', 'tfds_name', 'tfds_data_dir', 'tfds_caption_key', 'source')}


def _in_flags(message: str) -> str:
  for key, flag in _FLAGS_FOR_KEYS.items():
    message = message.replace(key, flag)
  return message
