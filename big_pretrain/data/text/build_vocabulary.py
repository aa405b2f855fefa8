"""The command that builds a vocabulary file from a data source's texts.

  python -m big_pretrain.data.text.build_vocabulary labels --source=image_folder \\
      --path=/data/images --min_count=5 --max_size=30000 --output=vocab.txt
  python -m big_pretrain.data.text.build_vocabulary tokenizer --source=image_folder \\
      --path=/data/images --min_count=5 --max_size=32000 --output=tokenizer.txt

`labels` writes a WSP label vocabulary (labels.py) of the source's hashtags
(and, with --use_caption_words, every word of its captions); `tokenizer` writes
the word vocabulary of a FLIP text tower (tokenizer.py) of its captions' words.
Both keep the most frequent, seen at least --min_count times, at most
--max_size of them, and exit 1 without writing when none is frequent enough.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Any, Sequence

from big_pretrain import commands
from big_pretrain.data.sources import source_texts
from big_pretrain.data.text import labels as labels_lib
from big_pretrain.data.text import tokenizer as tokenizer_lib
from big_pretrain.errors import EXIT_USAGE
from big_pretrain.storage import files as storage

PROGRAM = 'big_pretrain.data.text.build_vocabulary'  # every one-line message starts with it

# How the vocabularies shipped in big_pretrain/data/text/vocabularies/ were built: after
# changing the synthetic source, rebuild them with
#   python -m big_pretrain.data.text.build_vocabulary labels SYNTHETIC_BUILD_FLAGS \\
#       --output=big_pretrain/data/text/vocabularies/synthetic_shapes.txt
#   python -m big_pretrain.data.text.build_vocabulary tokenizer SYNTHETIC_BUILD_FLAGS \\
#       --output=big_pretrain/data/text/vocabularies/synthetic_captions_tokenizer.txt
# (the tests rebuild both to check that they are in sync with sources/synthetic.py).
SYNTHETIC_BUILD_FLAGS = (
    '--source=synthetic', '--num_examples=2000', '--min_count=1', '--max_size=1000')

# Per command: its help, what --min_count counts, and --max_size's default and help.
_COMMANDS = {
    'labels': ("Count a source's hashtags and write the most frequent as a label vocabulary.",
               'Keep tags carried by at least this many examples.',
               1000, 'Keep at most this many labels, the most frequent.'),
    'tokenizer': ("Count a source's caption words and write the most frequent as a vocabulary.",
                  'Keep words seen at least this many times.',
                  30000, 'Keep at most this many words (besides the 4 special tokens).'),
}


def _argument_parser() -> commands.CommandParser:
  parser = commands.CommandParser(
      PROGRAM, description="Vocabulary files from a data source's texts: WSP labels (labels) "
      'or the words of a FLIP text tower (tokenizer).')
  subcommands = parser.add_subparsers(dest='command', required=True)
  for name, (command_help, min_count_help, max_size, max_size_help) in _COMMANDS.items():
    command = subcommands.add_parser(name, help=command_help)
    source_texts.add_source_arguments(command)
    command.add_argument('--min_count', type=int, default=1, help=min_count_help)
    command.add_argument('--max_size', type=int, default=max_size, help=max_size_help)
    if name == 'labels':
      command.add_argument('--use_caption_words', action='store_true',
                           help='Count every word of the caption as well as its hashtags.')
    command.add_argument('--output', required=True, help='Where to write the vocabulary file.')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = _argument_parser()
  args = parser.parse_args(argv)
  if args.min_count < 1 or args.max_size < 1:
    parser.error(f'--min_count and --max_size must be positive, got {args.min_count} and'
                 f' {args.max_size}.')
  if storage.is_dir(args.output):
    parser.error(f'--output={args.output} is a folder: give the path of the vocabulary file '
                 'to write, e.g. vocab.txt.')
  # A source that cannot be read (no such folder, an unfinished conversion), or an --output
  # that cannot be written (checked before the source is read): nothing was written.
  with commands.one_line_errors(PROGRAM, argv, {(OSError, ValueError): EXIT_USAGE}):
    storage.check_writable_folder(os.path.dirname(os.path.abspath(args.output)), '--output',
                                  'give a file path in a folder this user can write')
    texts = source_texts.read_source_texts(args, parser)
    build = _build_labels if args.command == 'labels' else _build_tokenizer
    return build(texts, args)


def _build_labels(texts: list[dict[str, Any]], args: argparse.Namespace) -> int:
  vocabulary = labels_lib.build_vocabulary(texts, min_count=args.min_count,
                                           max_size=args.max_size,
                                           use_caption_words=args.use_caption_words)
  distinct_tags = set().union(
      *(labels_lib.example_tags(t, args.use_caption_words) for t in texts))
  print(f'Read {len(texts)} examples from the {args.source} source, with'
        f' {len(distinct_tags)} distinct tags.')
  if not len(vocabulary):
    print(f'No tag is carried by --min_count={args.min_count} examples; nothing written.'
          ' Lower --min_count, read more examples, or add --use_caption_words.',
          file=sys.stderr)
    return 1
  unlabelled = sum(
      not vocabulary.encode(t['hashtags'], t['caption'], args.use_caption_words) for t in texts)
  print(f'{unlabelled} of {len(texts)} examples have no label in the vocabulary'
        ' (WSP leaves them out of the loss).')
  vocabulary.write(args.output)
  print(f'Wrote {len(vocabulary)} labels to {args.output}.')
  return 0


def _build_tokenizer(texts: list[dict[str, Any]], args: argparse.Namespace) -> int:
  captions = [text['caption'] for text in texts]
  without_caption = sum(not caption.strip() for caption in captions)
  counts = collections.Counter(
      word for caption in captions for word in tokenizer_lib.split_words(caption))
  print(f'Read {len(captions)} captions from the {args.source} source, with'
        f' {len(counts)} distinct words.')
  if without_caption:
    print(f'{without_caption} examples have no caption (image folders read it from a .txt'
          ' file with the image\'s name).', file=sys.stderr)
  tokenizer = tokenizer_lib.build_tokenizer(captions, min_count=args.min_count,
                                            max_size=args.max_size)
  if not tokenizer.words:
    print(f'No word occurs --min_count={args.min_count} times; nothing written. Lower'
          ' --min_count or read more examples (do the images have .txt captions?).',
          file=sys.stderr)
    return 1
  known = set(tokenizer.words)
  unknown_occurrences = sum(count for word, count in counts.items() if word not in known)
  print(f'{unknown_occurrences} of {sum(counts.values())} word occurrences are not in the'
        ' vocabulary (they become <unk>).')
  tokenizer.write(args.output)
  print(f'Wrote {len(tokenizer.words)} words (+ {len(tokenizer_lib.SPECIAL_TOKENS)} special'
        f' tokens) to {args.output}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
