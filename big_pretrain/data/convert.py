"""Converts an image folder or webdataset tar shards into ArrayRecord shards.

  python -m big_pretrain.data.convert --input=/data/mydata/train --output=/data/mydata_ar/train
  python -m big_pretrain.data.convert --input='/data/web/shard-{00000..00099}.tar' \\
      --output=/data/web_ar
  # the same on Apache Beam: 2 processes here, or Dataflow / Flink / Spark workers
  python -m big_pretrain.data.convert --input='/data/web/shard-{00000..00099}.tar' \\
      --output=/data/web_ar --runner=DirectRunner --direct_num_workers=2 \\
      --direct_running_mode=multi_processing
  # leaving out near-duplicates of evaluation images
  python -m big_pretrain.data.convert --input=... --output=... \\
      --dedup_against=/data/imagenet/val --dedup_against='/data/eval/*.tar'

then train with ``--config.data.source=array_record --config.data.path=OUTPUT``.
What a conversion computes is defined once, in data/prepare/convert_job.py; without
--runner it runs there in this process, with one as a Beam pipeline
(data/prepare/convert_pipeline.py), with byte-identical output.

Inputs:
  * an image folder of class subfolders, ``DIR/<class_name>/**/<image>`` with
    an optional ``.txt`` caption beside each image, listed exactly as the
    'image_folder' source lists it (same order, labels and captions);
  * webdataset-style tar shards (a glob, ``{000..099}`` ranges, a list of
    files, or a folder of ``.tar`` files): members are grouped by key, the
    path up to the first dot of the file name (``dir/000123.jpg`` and
    ``dir/000123.txt`` are one example). A group's image is its .jpg, .jpeg,
    .png or .webp member; its caption the .txt member, else the 'caption' or
    'text' of its .json member; its label the integer in its .cls member, else
    -1. Groups without an image are skipped and counted. One tar makes one shard; a tar
    cut short keeps the groups before the cut, and is named in metadata.json.

Each record is an image record (data/records.py): the original encoded image
(never re-encoded), its caption (may be empty), its label (-1 when unknown)
and its key (where the example came from). Every image is decoded once to count the
undecodable ones (kept, and skipped when training, unless --undecodable=drop).
Shards are named ``SPLIT-00000-of-00004.array_record``; ``metadata.json`` (class
names, number of examples, the shards, what was skipped, the format version) is
written last, so a folder without it is an unfinished conversion, and says so when
read; running the same command again continues it, keeping the shards that finished.
The output is a deterministic function of the input.

With --dedup_against (image folders, tar shards or converted folders of held-out
images), training images within --max_distance bits of a held-out image's perceptual
hash (data/prepare/near_duplicates.py) are left out (--dedup=drop) or only listed
(--dedup=list); ``near_duplicates.json`` names each one and the held-out image it matched.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Sequence

from big_pretrain import commands
from big_pretrain.data.prepare import beam_options
from big_pretrain.data.prepare import convert_job
from big_pretrain.data.prepare.convert_job import (  # the converter's public names
    DEFAULT_EXAMPLES_PER_SHARD, WEBDATASET_IMAGE_EXTENSIONS, resolve_input)
from big_pretrain.errors import EXIT_STOPPED, UsageError
from big_pretrain.storage import files as storage


@dataclasses.dataclass
class ConversionSummary:
  """What a conversion read and wrote (its metadata.json, as fields)."""
  input_kind: str  # 'image_folder' or 'webdataset'
  num_inputs: int  # images listed, or tar shards read
  num_examples: int = 0
  num_with_caption: int = 0
  num_with_label: int = 0
  groups_without_image: int = 0
  undecodable_images: int = 0
  bad_labels: int = 0  # .cls members that are not an integer (label -1)
  bad_json: int = 0  # .json members that are not JSON objects (no caption from them)
  class_names: list[str] = dataclasses.field(default_factory=list)
  num_classes: int = 0
  shards: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  truncated_tars: list[str] = dataclasses.field(default_factory=list)
  near_duplicates: dict[str, Any] | None = None

  @classmethod
  def from_metadata(cls, metadata: dict[str, Any]) -> 'ConversionSummary':
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in metadata.items() if key in names})


def convert(inputs: Sequence[str] | str, output: str, *, examples_per_shard: int =
            DEFAULT_EXAMPLES_PER_SHARD, split: str = 'train', overwrite: bool = False,
            undecodable: str = 'keep', dedup_against: Sequence[str] = (), dedup: str = 'drop',
            max_distance: int | None = None, runner: str | None = None,
            beam_flags: Sequence[str] = ()) -> ConversionSummary:
  """Converts an image folder or webdataset tars (see the module doc) into ArrayRecord
  shards: in this process, or on the Beam `runner` with `beam_flags`."""
  if isinstance(inputs, str):
    inputs = [inputs]
  output = storage.absolute(output)
  # Every mistake found before the output is touched is a usage error: nothing was written.
  try:
    options = (beam_options.pipeline_options(
        runner, beam_flags, paths={'--input': inputs, '--output': output,
                                   '--dedup_against': dedup_against}) if runner else None)
    storage.check_writable_folder(output, '--output', 'give a folder for the shards')
    plan = convert_job.plan_conversion(
        inputs, output, split=split, examples_per_shard=examples_per_shard,
        undecodable=undecodable, held_out=dedup_against, dedup=dedup,
        max_distance=max_distance)
    convert_job.prepare_output(output, overwrite)
  except (OSError, ValueError) as error:
    raise UsageError(str(error)) from error
  if options is None:
    metadata = convert_job.convert_in_process(plan)
  else:
    from big_pretrain.data.prepare import convert_pipeline  # pylint: disable=g-import-not-at-top
    metadata, _ = convert_pipeline.run(plan, options)
  return ConversionSummary.from_metadata(metadata)


# --- Command line -----------------------------------------------------------------

PROGRAM = 'big_pretrain.data.convert'  # every one-line message starts with it


def _argument_parser() -> commands.CommandParser:
  parser = commands.CommandParser(
      PROGRAM, description='Convert an image folder (with .txt captions) or webdataset tar '
      'shards into ArrayRecord shards for --config.data.source=array_record, in this process '
      'or on Apache Beam (--runner).')
  parser.add_argument(
      '--input', required=True, nargs='+',
      help="An image folder of class subfolders, or webdataset tar shards: a glob in quotes"
      " ('shards/*.tar'), a range ('shard-{000..099}.tar'), files, or a folder of .tar files;"
      ' local or gs://.')
  parser.add_argument('--output', required=True, help='The folder to write the shards to.')
  parser.add_argument('--examples_per_shard', type=int, default=DEFAULT_EXAMPLES_PER_SHARD,
                      help='Image folders: images per ArrayRecord shard (each tar makes one).')
  parser.add_argument('--split', default='train',
                      help="Prefix of the shard file names (e.g. 'train' or 'val').")
  parser.add_argument('--overwrite', action='store_true',
                      help='Replace a finished conversion in --output.')
  parser.add_argument('--undecodable', choices=convert_job.UNDECODABLE_MODES, default='keep',
                      help='Images that do not decode: keep them (training skips and counts '
                      'them) or drop them here. Counted either way.')
  parser.add_argument(
      '--dedup_against', action='append', default=[],
      help='Held-out images (a folder of images, tar shards, or a converted folder; repeat '
      'for several sets): training images near-duplicate to one are dropped (--dedup).')
  parser.add_argument('--dedup', choices=convert_job.DEDUP_MODES, default='drop',
                      help='drop the near-duplicates, or only list them in near_duplicates.json.')
  parser.add_argument('--max_distance', type=int, default=None,
                      help='Near-duplicate: perceptual hashes at most this many bits apart (of'
                      ' 64; default: near_duplicates.DEFAULT_MAX_DISTANCE).')
  beam_options.add_runner_arguments(parser)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = _argument_parser()
  args, leftover = parser.parse_known_args(argv)
  beam_flags = beam_options.beam_flags_allowed(args, leftover, parser)
  with commands.one_line_errors(PROGRAM, argv, {(OSError, ValueError): EXIT_STOPPED}):
    summary = convert(args.input, args.output, examples_per_shard=args.examples_per_shard,
                      split=args.split, overwrite=args.overwrite, undecodable=args.undecodable,
                      dedup_against=args.dedup_against, dedup=args.dedup,
                      max_distance=args.max_distance, runner=args.runner,
                      beam_flags=beam_flags)
  read = (f'{summary.num_inputs} images of an image folder with {len(summary.class_names)}'
          ' classes' if summary.input_kind == 'image_folder'
          else f'{summary.num_inputs} webdataset tar shards')
  print(f'Read {read}{f" on {args.runner}" if args.runner else ""}.')
  print(f'Wrote {summary.num_examples} examples to {len(summary.shards)} ArrayRecord shards in'
        f' {args.output}: {summary.num_with_caption} with a caption, {summary.num_with_label}'
        f' with a label ({summary.num_classes} classes).')
  if summary.input_kind == 'webdataset':
    print(f'Skipped {summary.groups_without_image} key groups without an image'
          f' ({"/".join(WEBDATASET_IMAGE_EXTENSIONS)}).')
  if summary.truncated_tars:
    print(f'{len(summary.truncated_tars)} tars end mid-member (kept up to the cut): '
          f'{", ".join(summary.truncated_tars[:5])}{" ..." if len(summary.truncated_tars) > 5 else ""}')
  if summary.bad_labels or summary.bad_json:
    print(f'{summary.bad_labels} .cls members were not integers (label -1);'
          f' {summary.bad_json} .json members were not JSON objects (no caption).')
  print(f'{summary.undecodable_images} images do not decode: '
        + ('left out.' if args.undecodable == 'drop' else
           'kept, and skipped (counted) in training; --undecodable=drop leaves them out.'))
  if summary.near_duplicates:
    found = summary.near_duplicates
    print(f'{found["found"]} near-duplicates of held-out images'
          f' ({"dropped" if found["dedup"] == "drop" else "kept, listed"}; within'
          f' {found["max_distance"]} bits): {args.output}/{found["report"]} names each.')
  print(f'Use it with --config.data.source=array_record --config.data.path={args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
