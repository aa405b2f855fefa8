"""Converts an image folder or webdataset tar shards into ArrayRecord shards.

  python -m big_pretrain.data.convert --input=/data/mydata/train --output=/data/mydata_ar/train
  python -m big_pretrain.data.convert --input='/data/web/shard-{00000..00099}.tar' \\
      --output=/data/web_ar

then train with ``--config.data.source=array_record --config.data.path=OUTPUT``.

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
    -1. Groups without an image are skipped and counted.

Each record is an image record (data/records.py): the original encoded image
(never re-encoded), its caption (may be empty), its label (-1 when unknown)
and its key (where the example came from). Shards are named
``SPLIT-00000-of-00004.array_record``; ``metadata.json`` (class names, number
of examples, the shards, the format version) is written last, so a folder
without it is an unfinished conversion, and says so when read.
The output is a deterministic function of the input.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import re
import sys
import tarfile
from typing import Any, Iterable, Iterator, Sequence

from big_pretrain import commands
from big_pretrain.data import records as records_lib
from big_pretrain.data.sources.image_folder import ImageFolder
from big_pretrain.errors import EXIT_STOPPED, UsageError
from big_pretrain.storage import files as storage

DEFAULT_EXAMPLES_PER_SHARD = 10_000
# Grain reads records one at a time: group_size 1 makes each one directly addressable.
WRITER_OPTIONS = 'group_size:1'
WEBDATASET_IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
_INCOMPLETE = '.incomplete'
_SHARD_NAME = re.compile(r'^.+-\d{5}-of-\d{5}' + re.escape(records_lib.ARRAY_RECORD_SUFFIX) + '$')


@dataclasses.dataclass
class Record:
  """One example to write."""
  image: bytes
  caption: str
  label: int
  key: str


@dataclasses.dataclass
class ConversionSummary:
  """What a conversion read and wrote."""
  input_kind: str  # 'image_folder' or 'webdataset'
  num_inputs: int  # images listed, or tar shards read
  num_examples: int = 0
  num_with_caption: int = 0
  num_with_label: int = 0
  groups_without_image: int = 0
  bad_labels: int = 0  # .cls members that are not an integer (label -1)
  bad_json: int = 0  # .json members that are not JSON objects (no caption from them)
  class_names: list[str] = dataclasses.field(default_factory=list)
  num_classes: int = 0
  shards: list[dict[str, Any]] = dataclasses.field(default_factory=list)


# --- Inputs -----------------------------------------------------------------------

def _expand_braces(pattern: str) -> list[str]:
  """Webdataset's shard ranges: 'a-{000..002}.tar' -> ['a-000.tar', 'a-001.tar', 'a-002.tar']."""
  match = re.search(r'\{(\d+)\.\.(\d+)\}', pattern)
  if not match:
    return [pattern]
  first, last = match.group(1), match.group(2)
  padded = any(len(bound) > 1 and bound.startswith('0') for bound in (first, last))
  width = max(len(first), len(last)) if padded else 0
  head, tail = pattern[:match.start()], pattern[match.end():]
  return [expanded for number in range(int(first), int(last) + 1)
          for expanded in _expand_braces(f'{head}{number:0{width}d}{tail}')]


def _tar_paths(inputs: Sequence[str]) -> list[str]:
  paths = []
  for pattern in inputs:
    for expanded in _expand_braces(os.path.expanduser(pattern)):
      matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
      if not matches:
        raise FileNotFoundError(f'No tar shard matches {expanded!r}.')
      for match in matches:
        if not os.path.isfile(match):
          raise FileNotFoundError(f'Tar shard {match!r} does not exist.')
        if match not in paths:
          paths.append(match)
  return paths


def resolve_input(inputs: Sequence[str]) -> tuple[str, Any]:
  """('image_folder', folder) or ('webdataset', [tar paths]) for the --input values."""
  if len(inputs) == 1 and os.path.isdir(os.path.expanduser(inputs[0])):
    root = pathlib.Path(inputs[0]).expanduser()
    tars = sorted(str(f) for f in root.iterdir() if f.is_file() and _is_tar_name(f.name))
    has_subfolders = any(d.is_dir() and not d.name.startswith('.') for d in root.iterdir())
    if tars and not has_subfolders:
      return 'webdataset', tars
    return 'image_folder', str(root)
  if len(inputs) == 1 and not glob.has_magic(inputs[0]) and '{' not in inputs[0] and (
      not os.path.exists(os.path.expanduser(inputs[0]))):
    raise FileNotFoundError(
        f'--input={inputs[0]!r} does not exist. Give an image folder of class subfolders, or'
        " webdataset tar shards (a glob such as 'shards/*.tar' in quotes).")
  return 'webdataset', _tar_paths(inputs)


def _is_tar_name(name: str) -> bool:
  return name.endswith(('.tar', '.tar.gz', '.tgz'))


def image_folder_records(folder: str, summary: ConversionSummary) -> Iterator[Record]:
  """The 'image_folder' source's examples, with each image file's bytes."""
  source = ImageFolder(folder)
  summary.class_names = source.class_names
  summary.num_classes = source.num_classes
  summary.num_inputs = len(source)
  root = pathlib.Path(folder).expanduser()
  for index in range(len(source)):
    example = source[index]
    image_path = pathlib.Path(example['image_path'])
    yield Record(image=image_path.read_bytes(), caption=example['caption'],
                 label=example['label'], key=image_path.relative_to(root).as_posix())


def _split_key(name: str) -> tuple[str, str]:
  """Webdataset's key and extension: 'dir/000123.seg.png' -> ('dir/000123', 'seg.png')."""
  folder, _, base = name.rpartition('/')
  stem, _, extension = base.partition('.')
  return (f'{folder}/{stem}' if folder else stem), extension.lower()


def _tar_groups(tar_path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
  """(key, {extension: bytes}) for consecutive members sharing a key, in archive order."""
  key, group = None, {}
  try:
    with tarfile.open(tar_path, mode='r|*') as archive:  # Streamed: shards can be large.
      for member in archive:
        if not member.isfile():
          continue
        base = member.name.rpartition('/')[2]
        if base.startswith('.'):  # e.g. macOS '._' resource files
          continue
        member_key, extension = _split_key(member.name)
        if member_key != key:
          if group:
            yield key, group
          key, group = member_key, {}
        group[extension] = archive.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as error:
    raise ValueError(f'Cannot read tar shard {tar_path!r}: {error}') from error
  if group:
    yield key, group


def _group_caption(group: dict[str, bytes], summary: ConversionSummary) -> str:
  if 'txt' in group:
    return group['txt'].decode('utf-8', errors='replace').strip()
  if 'json' in group:
    try:
      fields = json.loads(group['json'].decode('utf-8', errors='replace'))
    except json.JSONDecodeError:
      fields = None
    if not isinstance(fields, dict):
      summary.bad_json += 1
      return ''
    for name in ('caption', 'text'):
      if isinstance(fields.get(name), str):
        return fields[name].strip()
  return ''


def _group_label(group: dict[str, bytes], summary: ConversionSummary) -> int:
  if 'cls' not in group:
    return -1
  try:
    return int(group['cls'].decode('utf-8', errors='replace').strip())
  except ValueError:
    summary.bad_labels += 1
    return -1


def webdataset_records(tar_paths: Sequence[str], summary: ConversionSummary) -> Iterator[Record]:
  """One Record per key group with an image, shard by shard in the given order."""
  summary.num_inputs = len(tar_paths)
  max_label = -1
  for tar_path in tar_paths:
    shard_name = os.path.basename(tar_path)
    for key, group in _tar_groups(tar_path):
      extension = next((ext for ext in WEBDATASET_IMAGE_EXTENSIONS if ext in group), None)
      if extension is None:
        summary.groups_without_image += 1
        continue
      label = _group_label(group, summary)
      max_label = max(max_label, label)
      summary.num_classes = max_label + 1
      yield Record(image=group[extension], caption=_group_caption(group, summary),
                   label=label, key=f'{shard_name}/{key}.{extension}')


# --- Output -----------------------------------------------------------------------

def _prepare_output(output: pathlib.Path, overwrite: bool) -> None:
  """Creates the folder; clears an earlier conversion only with --overwrite."""
  output.mkdir(parents=True, exist_ok=True)
  metadata = output / records_lib.METADATA_FILE
  earlier = sorted(f for f in output.iterdir() if f.is_file() and (
      _SHARD_NAME.match(f.name) or f.name.endswith(records_lib.ARRAY_RECORD_SUFFIX + _INCOMPLETE)))
  if not (earlier or metadata.exists()):
    return
  if not overwrite:
    raise FileExistsError(
        f'{str(output)!r} already holds a conversion ({len(earlier)} shard files'
        f'{", metadata.json" if metadata.exists() else ""}). Pass --overwrite to replace it,'
        ' or choose another --output.')
  metadata.unlink(missing_ok=True)  # First: the folder reads as unfinished from here on.
  for file in earlier:
    file.unlink()


def write_shards(records: Iterable[Record], output: pathlib.Path, *, split: str,
                 examples_per_shard: int, summary: ConversionSummary) -> None:
  """Writes the records in order, `examples_per_shard` to a shard, then names the shards.

  Shards are written under temporary names (the total is unknown until the
  input ends) and renamed SPLIT-0000i-of-0000n.array_record at the end.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  written: list[tuple[pathlib.Path, int]] = []
  writer, count = None, 0

  def close_shard():
    nonlocal writer
    if writer is not None:
      if not writer.ok():
        raise OSError(f'Writing {written[-1][0]} failed.')
      writer.close()
      writer = None

  for record in records:
    if writer is None:
      path = output / f'{split}-{len(written):05d}{records_lib.ARRAY_RECORD_SUFFIX}{_INCOMPLETE}'
      writer = array_record_module.ArrayRecordWriter(str(path), WRITER_OPTIONS)
      written.append((path, 0))
      count = 0
    writer.write(records_lib.encode_image_record(record.image, record.caption, record.label,
                                                 record.key))
    count += 1
    written[-1] = (written[-1][0], count)
    summary.num_examples += 1
    summary.num_with_caption += bool(record.caption)
    summary.num_with_label += record.label >= 0
    if count == examples_per_shard:
      close_shard()
  close_shard()

  for index, (path, num_examples) in enumerate(written):
    verify_shard(path, num_examples)
    name = f'{split}-{index:05d}-of-{len(written):05d}{records_lib.ARRAY_RECORD_SUFFIX}'
    path.rename(output / name)
    summary.shards.append({'file': name, 'num_examples': num_examples})


# Records read back per call when a written shard is verified.
_VERIFY_BATCH = 1024


def verify_shard(path: pathlib.Path, num_examples: int) -> None:
  """Reads a written shard back whole: as many records as were written, each passing its
  own hash; OSError naming the shard otherwise (a disk that dropped or altered a write)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  try:
    reader = array_record_module.ArrayRecordReader(str(path))
    try:
      found = reader.num_records()
      for start in range(0, found, _VERIFY_BATCH):
        reader.read(start, min(found, start + _VERIFY_BATCH))
    finally:
      reader.close()
  except RuntimeError as error:
    raise OSError(f'{path} does not read back ({str(error).splitlines()[0]}): the disk '
                  'altered what was written. Convert again, to another disk if it recurs.'
                  ) from error
  if found != num_examples:
    raise OSError(f'{path} holds {found} records after writing {num_examples}: the write '
                  'did not reach the disk whole. Convert again.')


def convert(inputs: Sequence[str] | str, output: str, *, examples_per_shard: int =
            DEFAULT_EXAMPLES_PER_SHARD, split: str = 'train',
            overwrite: bool = False) -> ConversionSummary:
  """Converts an image folder or webdataset tars (see the module doc) into ArrayRecord shards."""
  if isinstance(inputs, str):
    inputs = [inputs]
  output_dir = pathlib.Path(output).expanduser()
  # Every mistake found before the output is touched is a usage error: nothing was written.
  try:
    if examples_per_shard < 1:
      raise ValueError(f'--examples_per_shard must be positive, got {examples_per_shard}.')
    if not re.fullmatch(r'[\w.]+', split):
      raise ValueError(f'--split={split!r} names the shard files: use letters, digits, _ or .')
    storage.check_writable_folder(str(output_dir), '--output', 'give a folder for the shards')
    kind, resolved = resolve_input(inputs)
    summary = ConversionSummary(input_kind=kind, num_inputs=0)
    records = (image_folder_records(resolved, summary) if kind == 'image_folder'
               else webdataset_records(resolved, summary))
    records = _peek(records)  # A bad input fails here, before the output is touched.
    _prepare_output(output_dir, overwrite)
  except (OSError, ValueError) as error:
    raise UsageError(str(error)) from error
  write_shards(records, output_dir, split=split, examples_per_shard=examples_per_shard,
               summary=summary)
  if not summary.num_examples:
    raise ValueError(
        f'No examples found in {", ".join(inputs)}: {summary.groups_without_image} groups'
        ' had no .jpg/.jpeg/.png/.webp member.')
  metadata = {
      'format': records_lib.IMAGE_FORMAT,
      'format_version': records_lib.IMAGE_FORMAT_VERSION,
      'split': split,
      'input_kind': kind,
      'num_examples': summary.num_examples,
      'class_names': summary.class_names,
      'num_classes': summary.num_classes,
      'shards': summary.shards,
  }
  # Last, and atomically: its presence says the conversion finished.
  metadata_path = output_dir / records_lib.METADATA_FILE
  partial = metadata_path.with_name(metadata_path.name + _INCOMPLETE)
  partial.write_text(json.dumps(metadata, indent=2) + '\n', encoding='utf-8')
  partial.replace(metadata_path)
  return summary


def _peek(records: Iterator[Record]) -> Iterator[Record]:
  """Starts the iterator now (so its errors come before any output), yielding every record."""
  first = next(records, None)

  def chained():
    if first is not None:
      yield first
      yield from records

  return chained()


# --- Command line -----------------------------------------------------------------

PROGRAM = 'big_pretrain.data.convert'  # every one-line message starts with it


def _argument_parser() -> commands.CommandParser:
  parser = commands.CommandParser(
      PROGRAM, description='Convert an image folder (with .txt captions) or webdataset tar '
      'shards into ArrayRecord shards for --config.data.source=array_record.')
  parser.add_argument(
      '--input', required=True, nargs='+',
      help="An image folder of class subfolders, or webdataset tar shards: a glob in quotes"
      " ('shards/*.tar'), a range ('shard-{000..099}.tar'), files, or a folder of .tar files.")
  parser.add_argument('--output', required=True, help='The folder to write the shards to.')
  parser.add_argument('--examples_per_shard', type=int, default=DEFAULT_EXAMPLES_PER_SHARD,
                      help='Records per ArrayRecord shard.')
  parser.add_argument('--split', default='train',
                      help="Prefix of the shard file names (e.g. 'train' or 'val').")
  parser.add_argument('--overwrite', action='store_true',
                      help='Replace an earlier conversion in --output.')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = _argument_parser().parse_args(argv)
  with commands.one_line_errors(PROGRAM, argv, {(OSError, ValueError): EXIT_STOPPED}):
    summary = convert(args.input, args.output, examples_per_shard=args.examples_per_shard,
                      split=args.split, overwrite=args.overwrite)
  read = (f'{summary.num_inputs} images of an image folder with {len(summary.class_names)}'
          ' classes' if summary.input_kind == 'image_folder'
          else f'{summary.num_inputs} webdataset tar shards')
  print(f'Read {read}.')
  print(f'Wrote {summary.num_examples} examples to {len(summary.shards)} ArrayRecord shards in'
        f' {args.output}: {summary.num_with_caption} with a caption, {summary.num_with_label}'
        f' with a label ({summary.num_classes} classes).')
  if summary.input_kind == 'webdataset':
    print(f'Skipped {summary.groups_without_image} key groups without an image'
          f' ({"/".join(WEBDATASET_IMAGE_EXTENSIONS)}).')
  if summary.bad_labels or summary.bad_json:
    print(f'{summary.bad_labels} .cls members were not integers (label -1);'
          f' {summary.bad_json} .json members were not JSON objects (no caption).')
  print('Images are not decoded here: corrupt ones are skipped, and counted, in training.')
  print(f'Use it with --config.data.source=array_record --config.data.path={args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
