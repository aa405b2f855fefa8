"""The command that builds a vocabulary file from a data source's texts.

  python -m big_pretrain.data.text.build_vocabulary labels --source=image_folder \\
      --path=/data/images --min_count=5 --max_size=30000 --output=vocab.txt
  python -m big_pretrain.data.text.build_vocabulary tokenizer --source=image_folder \\
      --path=/data/images --min_count=5 --max_size=32000 --output=tokenizer.txt

  python -m big_pretrain.data.text.build_vocabulary captions --source=image_folder \\
      --path=/data/images --sample_size=1000000 --output=captions.txt

`labels` writes a WSP label vocabulary (labels.py) of the source's hashtags
(and, with --use_caption_words, every word of its captions); `tokenizer` writes
the word vocabulary of a FLIP text tower (tokenizer.py) of its captions' words.
Both keep the most frequent, seen at least --min_count times, at most
--max_size of them, and exit 1 without writing when none is frequent enough.
`captions` writes --sample_size of the captions, one per line, the same ones
however the job runs: the text to train a SentencePiece tokenizer on
(sentencepiece_tokenizer.py).

Each runs in this process, or with --runner=... as an Apache Beam pipeline, with
Beam's options after it (data/prepare/beam_options.py), e.g.
  ... --runner=DirectRunner --direct_num_workers=8 --direct_running_mode=multi_processing
  ... --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
Both compute the same thing (data/prepare/vocabulary_job.py; the pipeline:
vocabulary_pipeline.py) and write the same file.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from big_pretrain import commands
from big_pretrain.data.prepare import beam_options
from big_pretrain.data.prepare import vocabulary_job
from big_pretrain.data.prepare import vocabulary_pipeline
from big_pretrain.data.sources import source_texts
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

# Per vocabulary command: its help, what --min_count counts, and --max_size's default and help.
_COMMANDS = {
    'labels': ("Count a source's hashtags and write the most frequent as a label vocabulary.",
               'Keep tags carried by at least this many examples.',
               1000, 'Keep at most this many labels, the most frequent.'),
    'tokenizer': ("Count a source's caption words and write the most frequent as a vocabulary.",
                  'Keep words seen at least this many times.',
                  30000, 'Keep at most this many words (besides the 4 special tokens).'),
}
CAPTIONS_HELP = ("Write a fixed sample of a source's captions, one per line: the text to train"
                 ' a SentencePiece tokenizer on.')


def _argument_parser() -> commands.CommandParser:
  parser = commands.CommandParser(
      PROGRAM, description="Vocabulary files from a data source's texts: WSP labels (labels) "
      'or the words of a FLIP text tower (tokenizer); or a sample of its captions to train a '
      'SentencePiece tokenizer on (captions).')
  subcommands = parser.add_subparsers(dest='command', required=True)
  for name, (command_help, min_count_help, max_size, max_size_help) in _COMMANDS.items():
    # No abbreviated flags: every flag the command does not know goes to Beam.
    command = subcommands.add_parser(name, help=command_help, allow_abbrev=False)
    source_texts.add_source_arguments(command)
    command.add_argument('--min_count', type=int, default=1, help=min_count_help)
    command.add_argument('--max_size', type=int, default=max_size, help=max_size_help)
    if name == 'labels':
      command.add_argument('--use_caption_words', action='store_true',
                           help='Count every word of the caption as well as its hashtags.')
    command.add_argument('--output', required=True, help='Where to write the vocabulary file.')
    beam_options.add_runner_arguments(command)
  command = subcommands.add_parser('captions', help=CAPTIONS_HELP, allow_abbrev=False)
  source_texts.add_source_arguments(command)
  command.add_argument('--sample_size', type=int, default=1_000_000,
                       help='Write this many captions (all the non-empty ones if fewer), those '
                       'with the smallest hashes of (example index, caption).')
  command.add_argument('--output', required=True, help='Where to write the captions.')
  beam_options.add_runner_arguments(command)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = _argument_parser()
  args, leftover = parser.parse_known_args(argv)
  beam_flags = beam_options.beam_flags_allowed(args, leftover, parser)
  if args.command == 'captions':
    if args.sample_size < 1:
      parser.error(f'--sample_size must be positive, got {args.sample_size}.')
    job = vocabulary_job.CaptionSample(args.sample_size)
  else:
    if args.min_count < 1 or args.max_size < 1:
      parser.error(f'--min_count and --max_size must be positive, got {args.min_count} and'
                   f' {args.max_size}.')
    job = vocabulary_job.VocabularyJob(args.command, args.min_count, args.max_size,
                                       getattr(args, 'use_caption_words', False))
  if storage.is_dir(args.output):
    parser.error(f'--output={args.output} is a folder: give the path of the file to write, '
                 'e.g. vocab.txt.')
  flags = source_texts.source_flags(args, parser)
  # An --output that cannot be written, a runner or Beam flag that does not exist (checked
  # before the source is read), a source that cannot be read (no such folder, an unfinished
  # conversion), or a Beam step that failed (its error; --verbose: the runner's whole
  # message): one line, and nothing was written.
  with commands.one_line_errors(PROGRAM, argv, {
      (OSError, ValueError, vocabulary_pipeline.PipelineFailed): EXIT_USAGE}):
    storage.check_writable_folder(os.path.dirname(storage.absolute(args.output)), '--output',
                                  'give a file path in a folder this user can write')
    reader = source_texts.TextReader(flags)
    if args.runner:
      options = beam_options.pipeline_options(
          args.runner, beam_flags,
          paths={'--path': args.path, '--tfds_data_dir': args.tfds_data_dir,
                 '--output': args.output})
      report = vocabulary_pipeline.run(job, reader, args.output, options)
    else:
      report = job.run_in_process(reader, args.output)
    return _REPORTS[args.command](report, args)


def _report_labels(report: dict[str, int], args: argparse.Namespace) -> int:
  examples = report.get('examples', 0)
  print(f'Read {examples} examples from the {args.source} source, with'
        f' {report.get("distinct", 0)} distinct tags.')
  if not report.get('size'):
    print(f'No tag is carried by --min_count={args.min_count} examples; nothing written.'
          ' Lower --min_count, read more examples, or add --use_caption_words.',
          file=sys.stderr)
    return 1
  print(f'{report.get("unlabelled", 0)} of {examples} examples have no label in the vocabulary'
        ' (WSP leaves them out of the loss).')
  print(f'Wrote {report["size"]} labels to {args.output}.')
  return 0


def _report_tokenizer(report: dict[str, int], args: argparse.Namespace) -> int:
  print(f'Read {report.get("examples", 0)} captions from the {args.source} source, with'
        f' {report.get("distinct", 0)} distinct words.')
  if report.get('without_caption'):
    print(f'{report["without_caption"]} examples have no caption (image folders read it from a'
          ' .txt file with the image\'s name).', file=sys.stderr)
  if not report.get('size'):
    print(f'No word occurs --min_count={args.min_count} times; nothing written. Lower'
          ' --min_count or read more examples (do the images have .txt captions?).',
          file=sys.stderr)
    return 1
  print(f'{report.get("unknown", 0)} of {report.get("occurrences", 0)} word occurrences are'
        ' not in the vocabulary (they become <unk>).')
  print(f'Wrote {report["size"]} words (+ {len(tokenizer_lib.SPECIAL_TOKENS)} special'
        f' tokens) to {args.output}.')
  return 0


def _report_captions(report: dict[str, int], args: argparse.Namespace) -> int:
  print(f'Read {report.get("examples", 0)} examples from the {args.source} source.')
  if report.get('without_caption'):
    print(f'{report["without_caption"]} examples have no caption (image folders read it from a'
          ' .txt file with the image\'s name).', file=sys.stderr)
  size = report.get('size', 0)
  if not size:
    print('No example has a caption; nothing written.', file=sys.stderr)
    return 1
  fewer = (f' (every caption: there are fewer than --sample_size={args.sample_size})'
           if size < args.sample_size else '')
  print(f'Wrote {size} captions{fewer} to {args.output}.')
  return 0


_REPORTS = {'labels': _report_labels, 'tokenizer': _report_tokenizer,
            'captions': _report_captions}


if __name__ == '__main__':
  sys.exit(main())
