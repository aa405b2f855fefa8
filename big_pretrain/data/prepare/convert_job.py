"""What a conversion computes, as steps that run in process or as a Beam pipeline.

The one definition of `python -m big_pretrain.data.convert`. A conversion is:

1. `plan_conversion` (on the launching machine): the inputs listed, each checked to be what
   it says, cut into work items, one per output shard: a webdataset tar becomes one shard;
   an image folder's listing is cut every --examples_per_shard images. Shard i of n is
   named SPLIT-0000i-of-0000n.array_record before any work starts, so where a shard lands
   depends on nothing but the input.
2. `held_out_hashes` (only with --dedup_against): a perceptual hash of every held-out
   image, sorted by key; `hash_held_out_item` does one work item of it.
3. `convert_shard` (one per work item, on any worker, in any order, retried at will): reads
   its input, decodes every image once to count the undecodable ones (and hash it when
   deduplicating), drops or lists the near-duplicates of held-out images, writes the
   original bytes to a temporary file, reads it back whole, and renames it into place with
   a small record of what it held. A rerun after a crash keeps the shards that finished.
4. `finish_conversion` (once, after every shard): the near-duplicates report, then
   metadata.json, the mark of a finished conversion, from the shards' records alone.

The in-process path (convert.py, no --runner) calls these in a loop; the Beam pipeline
(convert_pipeline.py) calls the same functions from its transforms. The output is a
function of the input only: byte-identical shards and metadata.json whatever the runner,
the number of workers, the order the shards finish in, or the retries.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import gzip
import hashlib
import itertools
import json
import os
import pathlib
import re
import shutil
import tarfile
import tempfile
import uuid
from typing import Any, Collection, Iterable, Iterator, Sequence

from etils import epath
import numpy as np

from big_pretrain.data import records as records_lib
from big_pretrain.data.sources import image_folder
from big_pretrain.errors import DamagedFileError
from big_pretrain.storage import files as storage

DEFAULT_EXAMPLES_PER_SHARD = 10_000
# Grain reads records one at a time: group_size 1 makes each one directly addressable.
WRITER_OPTIONS = 'group_size:1'
WEBDATASET_IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
INCOMPLETE = '.incomplete'
# Per finished shard, what it holds (counts, near-duplicates): what finish_conversion and a
# rerun read. Removed once metadata.json is written.
PROGRESS_FOLDER = '.conversion'
NEAR_DUPLICATES_FILE = 'near_duplicates.json'
DEDUP_MODES = ('drop', 'list')
UNDECODABLE_MODES = ('keep', 'drop')
SHARD_NAME = re.compile(r'^.+-\d{5}-of-\d{5}' + re.escape(records_lib.ARRAY_RECORD_SUFFIX) + '$')
# Threads that look at the tars' first bytes while planning (bucket reads wait on the network).
_PLAN_THREADS = 16
# Records decoded and matched against the held-out hashes at a time.
_BLOCK = 256
# Records read back per call when a written shard is verified.
_VERIFY_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class WorkItem:
  """One output shard's input (or one part of the held-out sets): a tar, a run of an image
  folder's listing, or (held-out only) a converted ArrayRecord folder."""
  index: int
  tar_path: str | None = None
  images: tuple[tuple[str, int], ...] = ()  # image files: (path, label), listing order
  root: str | None = None  # the folder `images` are under: keys are paths below it
  record_folder: str | None = None


@dataclasses.dataclass(frozen=True)
class ConversionPlan:
  """Everything every step needs: made once, read-only, small enough to ship to workers."""
  input_kind: str  # 'image_folder' or 'webdataset'
  inputs: tuple[str, ...]
  output: str
  split: str
  num_inputs: int  # images listed, or tar shards
  class_names: tuple[str, ...]
  items: tuple[WorkItem, ...]
  undecodable: str = 'keep'
  held_out: tuple[str, ...] = ()  # --dedup_against
  held_out_items: tuple[WorkItem, ...] = ()
  dedup: str = 'drop'
  max_distance: int = 0
  # What a shard's record is checked against before a rerun reuses the shard: a digest of
  # everything above but the output folder (set by plan_conversion, once: plans of 40,000
  # tars are megabytes).
  fingerprint: str = ''

  @property
  def num_shards(self) -> int:
    return len(self.items)

  def shard_name(self, index: int) -> str:
    return (f'{self.split}-{index:05d}-of-{self.num_shards:05d}'
            f'{records_lib.ARRAY_RECORD_SUFFIX}')

  def with_fingerprint(self) -> 'ConversionPlan':
    fields = dataclasses.asdict(self)
    for name in ('output', 'fingerprint'):
      fields.pop(name)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return dataclasses.replace(self, fingerprint=digest)


@dataclasses.dataclass
class ShardResult:
  """What one shard read and wrote: what metadata.json and Beam's counters are made of."""
  index: int
  file: str | None  # None: nothing to write (every group without an image, or dropped)
  num_examples: int = 0
  num_with_caption: int = 0
  num_with_label: int = 0
  max_label: int = -1
  groups_without_image: int = 0
  undecodable_images: int = 0
  bad_labels: int = 0  # .cls members that are not an integer (label -1)
  bad_json: int = 0  # .json members that are not JSON objects (no caption from them)
  truncated_tar: bool = False  # the tar ended mid-member: the groups before the cut are kept
  near_duplicates: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class HeldOutHashes:
  """The held-out images' perceptual hashes, sorted by key (ties go to the first key)."""
  keys: tuple[str, ...]
  hashes: np.ndarray  # uint64

  @classmethod
  def from_pairs(cls, pairs: Sequence[tuple[str, str]]) -> 'HeldOutHashes':
    """From hash_held_out_item's (key, hex hash) pairs, in any order."""
    from big_pretrain.data.prepare import near_duplicates  # pylint: disable=g-import-not-at-top
    ordered = sorted(pairs)
    return cls(tuple(key for key, _ in ordered),
               near_duplicates.hashes_array([int(value, 16) for _, value in ordered]))


@dataclasses.dataclass
class Record:
  """One example to write."""
  image: bytes
  caption: str
  label: int
  key: str


# --- Inputs -----------------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
  """Webdataset's shard ranges: 'a-{000..002}.tar' -> ['a-000.tar', 'a-001.tar', 'a-002.tar']."""
  match = re.search(r'\{(\d+)\.\.(\d+)\}', pattern)
  if not match:
    return [pattern]
  first, last = match.group(1), match.group(2)
  padded = any(len(bound) > 1 and bound.startswith('0') for bound in (first, last))
  width = max(len(first), len(last)) if padded else 0
  head, tail = pattern[:match.start()], pattern[match.end():]
  return [expanded for number in range(int(first), int(last) + 1)
          for expanded in expand_braces(f'{head}{number:0{width}d}{tail}')]


def _glob(pattern: str) -> list[str]:
  if not storage.is_bucket(pattern):
    return sorted(glob.glob(pattern))
  scheme, _, rest = pattern.partition('://')
  parts = rest.split('/')
  fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
  root = epath.Path(f'{scheme}://{"/".join(parts[:fixed])}')
  return sorted(str(path) for path in root.glob('/'.join(parts[fixed:])))


def tar_paths(inputs: Sequence[str]) -> list[str]:
  """The tar files that --input values name (globs, ranges, files), in order, each once."""
  paths = []
  for pattern in inputs:
    for expanded in expand_braces(os.path.expanduser(pattern)):
      matches = _glob(expanded) if glob.has_magic(expanded) else [expanded]
      if not matches:
        raise FileNotFoundError(f'No tar shard matches --input={expanded!r}.')
      for match in matches:  # whether each is there is checked with its header, in threads
        if match not in paths:
          paths.append(match)
  return paths


def resolve_input(inputs: Sequence[str]) -> tuple[str, Any]:
  """('image_folder', folder) or ('webdataset', [tar paths]) for the --input values."""
  if len(inputs) == 1 and storage.is_dir(os.path.expanduser(inputs[0])):
    root = epath.Path(os.path.expanduser(inputs[0]))
    entries = list(root.iterdir())
    tars = sorted(str(f) for f in entries if _is_tar_name(f.name) and f.is_file())
    has_subfolders = any(d.is_dir() and not d.name.startswith('.') for d in entries)
    if tars and not has_subfolders:
      return 'webdataset', tars
    return 'image_folder', str(root)
  if len(inputs) == 1 and not glob.has_magic(inputs[0]) and '{' not in inputs[0] and (
      not storage.exists(os.path.expanduser(inputs[0]))):
    raise FileNotFoundError(
        f'--input={inputs[0]!r} does not exist. Give an image folder of class subfolders, or'
        " webdataset tar shards (a glob such as 'shards/*.tar' in quotes).")
  return 'webdataset', tar_paths(inputs)


def _is_tar_name(name: str) -> bool:
  return name.endswith(('.tar', '.tar.gz', '.tgz'))


def check_is_tar(path: str) -> None:
  """ValueError naming `path` unless it starts as a tar does (read: its first member's
  header). A tar cut short further on is not refused: its groups before the cut are kept."""
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f'Tar shard {path!r} does not exist.')
  try:
    with epath.Path(path).open('rb') as file, tarfile.open(fileobj=file, mode='r|*') as archive:
      archive.next()
  except (tarfile.TarError, OSError, EOFError) as error:
    raise ValueError(f'{path!r} is not a tar file ({error}). Give webdataset tar shards, or '
                     'an image folder of class subfolders.') from error


def _tar_groups(tar_path: str) -> Iterator[tuple[str, dict[str, bytes]] | None]:
  """(key, {extension: bytes}) for consecutive members sharing a key, in archive order; a
  final None if the tar ends mid-member (the group being read then is left out)."""
  key, group = None, {}
  with epath.Path(tar_path).open('rb') as file:
    try:
      with tarfile.open(fileobj=file, mode='r|*') as archive:  # Streamed: shards can be large.
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
          data = archive.extractfile(member).read()
          if len(data) < member.size:  # a streamed tar cut mid-member reads short, silently
            raise EOFError(f'{member.name} has {len(data)} of its {member.size} bytes')
          group[extension] = data
      # A streamed tar stops quietly at a header cut short: whole only if the end-of-archive
      # zero block is where the next header would be.
      if not _zero_block_at(tar_path, archive.offset):
        raise EOFError(f'no end-of-archive block at {archive.offset}')
    except (tarfile.TarError, OSError, EOFError):
      yield None  # truncated: what came before the cut is whole
      return
  if group:
    yield key, group


def _zero_block_at(tar_path: str, offset: int) -> bool:
  with epath.Path(tar_path).open('rb') as raw:
    compressed = raw.read(2) == b'\x1f\x8b'
    raw.seek(0)
    stream = gzip.GzipFile(fileobj=raw) if compressed else raw
    stream.seek(offset)
    return stream.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)


def _split_key(name: str) -> tuple[str, str]:
  """Webdataset's key and extension: 'dir/000123.seg.png' -> ('dir/000123', 'seg.png')."""
  folder, _, base = name.rpartition('/')
  stem, _, extension = base.partition('.')
  return (f'{folder}/{stem}' if folder else stem), extension.lower()


def _group_caption(group: dict[str, bytes], result: ShardResult) -> str:
  if 'txt' in group:
    return group['txt'].decode('utf-8', errors='replace').strip()
  if 'json' in group:
    try:
      fields = json.loads(group['json'].decode('utf-8', errors='replace'))
    except json.JSONDecodeError:
      fields = None
    if not isinstance(fields, dict):
      result.bad_json += 1
      return ''
    for name in ('caption', 'text'):
      if isinstance(fields.get(name), str):
        return fields[name].strip()
  return ''


def _group_label(group: dict[str, bytes], result: ShardResult) -> int:
  if 'cls' not in group:
    return -1
  try:
    return int(group['cls'].decode('utf-8', errors='replace').strip())
  except ValueError:
    result.bad_labels += 1
    return -1


def webdataset_records(tar_path: str, result: ShardResult) -> Iterator[Record]:
  """One Record per key group with an image, in archive order."""
  shard_name = os.path.basename(tar_path)
  for entry in _tar_groups(tar_path):
    if entry is None:
      result.truncated_tar = True
      return
    key, group = entry
    extension = next((ext for ext in WEBDATASET_IMAGE_EXTENSIONS if ext in group), None)
    if extension is None:
      result.groups_without_image += 1
      continue
    yield Record(image=group[extension], caption=_group_caption(group, result),
                 label=_group_label(group, result), key=f'{shard_name}/{key}.{extension}')


def image_folder_records(root: str, images: Sequence[tuple[str, int]]) -> Iterator[Record]:
  """The 'image_folder' source's examples (caption from the .txt beside the image)."""
  prefix = str(root).rstrip('/') + '/'
  for image_path, label in images:
    yield Record(image=epath.Path(image_path).read_bytes(),
                 caption=image_folder.read_caption(image_path), label=label,
                 key=image_path[len(prefix):])


def work_item_records(item: WorkItem, result: ShardResult) -> Iterator[Record]:
  """The records of one work item's input, in order."""
  if item.tar_path is not None:
    return webdataset_records(item.tar_path, result)
  if item.record_folder is not None:
    return _converted_records(item.record_folder)
  return image_folder_records(item.root, item.images)


def _converted_records(folder: str) -> Iterator[Record]:
  from big_pretrain.data.sources.array_record import ArrayRecordSource  # pylint: disable=g-import-not-at-top
  source = ArrayRecordSource(folder)
  for index in range(len(source)):
    example = source[index]
    yield Record(image=example['image_bytes'], caption=example['caption'],
                 label=example['label'], key=example['key'])


# --- 1. Plan ----------------------------------------------------------------------

def plan_conversion(inputs: Sequence[str], output: str, *, split: str = 'train',
                    examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD,
                    undecodable: str = 'keep', held_out: Sequence[str] = (),
                    dedup: str = 'drop', max_distance: int | None = None) -> ConversionPlan:
  """The work, listed and checked: ValueError / OSError for a mistake in the inputs, before
  anything is written."""
  if examples_per_shard < 1:
    raise ValueError(f'--examples_per_shard must be positive, got {examples_per_shard}.')
  if not re.fullmatch(r'[\w.]+', split):
    raise ValueError(f'--split={split!r} names the shard files: use letters, digits, _ or .')
  if undecodable not in UNDECODABLE_MODES:
    raise ValueError(f'--undecodable={undecodable!r}: choose one of {", ".join(UNDECODABLE_MODES)}.')
  if dedup not in DEDUP_MODES:
    raise ValueError(f'--dedup={dedup!r}: choose one of {", ".join(DEDUP_MODES)}.')
  kind, resolved = resolve_input(inputs)
  items, class_names, num_inputs = _work_items(kind, resolved, examples_per_shard)
  held_out_items = ()
  if held_out:
    from big_pretrain.data.prepare import near_duplicates  # pylint: disable=g-import-not-at-top
    max_distance = near_duplicates.DEFAULT_MAX_DISTANCE if max_distance is None else max_distance
    if not 0 <= max_distance <= 64:
      raise ValueError(f'--max_distance={max_distance}: a Hamming distance between 64-bit '
                       'hashes, from 0 to 64.')
    held_out_items = _held_out_items(held_out, examples_per_shard)
  return ConversionPlan(
      input_kind=kind, inputs=tuple(inputs), output=str(output), split=split,
      num_inputs=num_inputs, class_names=tuple(class_names), items=tuple(items),
      undecodable=undecodable, held_out=tuple(held_out), held_out_items=tuple(held_out_items),
      dedup=dedup, max_distance=int(max_distance or 0)).with_fingerprint()


def _work_items(kind: str, resolved: Any, examples_per_shard: int):
  if kind == 'webdataset':
    _check_tars(resolved)
    return ([WorkItem(index=i, tar_path=path) for i, path in enumerate(resolved)], [],
            len(resolved))
  source = image_folder.ImageFolder(resolved)
  listing = source.listing()
  items = [WorkItem(index=i, images=tuple(listing[start:start + examples_per_shard]),
                    root=resolved)
           for i, start in enumerate(range(0, len(listing), examples_per_shard))]
  return items, source.class_names, len(listing)


def _check_tars(paths: Sequence[str]) -> None:
  with concurrent.futures.ThreadPoolExecutor(_PLAN_THREADS) as threads:
    for _ in threads.map(check_is_tar, paths):
      pass


def _held_out_items(held_out: Sequence[str], examples_per_shard: int) -> list[WorkItem]:
  """Work items hashing the held-out sets: tars, converted ArrayRecord folders, or folders of
  images (every image under them, any layout). Numbered after one another."""
  items = []
  for path in held_out:
    expanded = os.path.expanduser(path)
    if storage.is_dir(expanded) and storage.exists(
        os.path.join(expanded, records_lib.METADATA_FILE)):
      items.append(WorkItem(index=len(items), record_folder=expanded))
      continue
    if storage.is_dir(expanded) and not any(
        _is_tar_name(p.name) for p in epath.Path(expanded).iterdir()):
      images = sorted(str(folder / name) for folder, _, names in epath.Path(expanded).walk()
                      for name in names if not name.startswith('.') and
                      os.path.splitext(name)[1].lower() in image_folder.IMAGE_EXTENSIONS)
      if not images:
        raise FileNotFoundError(f'--dedup_against={path!r} holds no images.')
      parent = os.path.dirname(expanded.rstrip('/'))  # keys start with the folder's name
      items.extend(WorkItem(index=len(items) + i, root=parent,
                            images=tuple((p, -1) for p in images[start:start + examples_per_shard]))
                   for i, start in enumerate(range(0, len(images), examples_per_shard)))
      continue
    try:
      _, tars = resolve_input([path])
    except FileNotFoundError as error:
      raise FileNotFoundError(f'--dedup_against: {error}') from error
    _check_tars(tars)
    items.extend(WorkItem(index=len(items) + i, tar_path=tar) for i, tar in enumerate(tars))
  return items


# --- 2. Held-out hashes -------------------------------------------------------------

def hash_held_out_item(item: WorkItem) -> list[tuple[str, str]]:
  """(key, perceptual hash in hex) of each decodable image of one held-out work item. The key says
  which held-out image it is: 'folder/class/image.jpg', 'shard.tar/key.jpg', or a converted
  folder's 'folder:record key'."""
  from big_pretrain.data.prepare import near_duplicates  # pylint: disable=g-import-not-at-top
  prefix = (os.path.basename(item.record_folder.rstrip('/')) + ':' if item.record_folder
            else '')
  pairs = []
  for record in work_item_records(item, ShardResult(index=item.index, file=None)):
    try:  # as hex: Beam's integer coder stops at 2**63
      pairs.append((prefix + record.key, f'{near_duplicates.perceptual_hash(record.image):016x}'))
    except near_duplicates.UndecodableImage:
      continue  # nothing to match against
  return pairs


def held_out_hashes(plan: ConversionPlan) -> HeldOutHashes | None:
  """Step 2 in this process."""
  if not plan.held_out:
    return None
  return HeldOutHashes.from_pairs(
      [pair for item in plan.held_out_items for pair in hash_held_out_item(item)])


# --- 3. One shard -----------------------------------------------------------------

def convert_shard(plan: ConversionPlan, item: WorkItem,
                  held_out: HeldOutHashes | None = None) -> ShardResult:
  """Writes shard `item.index`; safe to run again, and to run twice at once (each attempt
  writes its own temporary file; the renames put the same bytes in place)."""
  name = plan.shard_name(item.index)
  finished = _finished_shard(plan, name)
  if finished is not None:
    return finished
  result = ShardResult(index=item.index, file=name)
  _write_verified(_checked_records(plan, item, held_out, result),
                  epath.Path(plan.output) / name, result)
  storage.write_text(str(_progress_path(plan, name)),
                     json.dumps({'plan': plan.fingerprint,
                                 'result': dataclasses.asdict(result)}) + '\n')
  return result


def _checked_records(plan: ConversionPlan, item: WorkItem, held_out: HeldOutHashes | None,
                     result: ShardResult) -> Iterator[Record]:
  """The item's records that go in the shard: each image decoded once (hashed when
  deduplicating), undecodable ones counted, near-duplicates of held-out images dropped or
  listed. Streams, a block of records at a time (a 10k-image tar is a gigabyte)."""
  records = work_item_records(item, result)
  while block := list(itertools.islice(records, _BLOCK)):
    yield from _checked_block(plan, block, held_out, result)


def _checked_block(plan: ConversionPlan, block: list[Record], held_out: HeldOutHashes | None,
                   result: ShardResult) -> Iterator[Record]:
  from big_pretrain.data.prepare import near_duplicates  # pylint: disable=g-import-not-at-top
  hashes = np.zeros(len(block), np.uint64)
  decodable = np.ones(len(block), bool)
  for position, record in enumerate(block):
    try:
      if held_out is not None:
        hashes[position] = near_duplicates.perceptual_hash(record.image)
      else:
        near_duplicates.decoded_for_hash(record.image)
    except near_duplicates.UndecodableImage:
      decodable[position] = False
      result.undecodable_images += 1
  matched, distances = np.full(len(block), -1), np.zeros(len(block), int)
  if held_out is not None and len(held_out.keys) and decodable.any():
    positions = np.flatnonzero(decodable)
    nearest, distance = near_duplicates.nearest(hashes[positions], held_out.hashes)
    close = distance <= plan.max_distance
    matched[positions[close]] = nearest[close]
    distances[positions] = distance
  for position, record in enumerate(block):
    if not decodable[position] and plan.undecodable == 'drop':
      continue
    if matched[position] >= 0:
      result.near_duplicates.append({'key': record.key,
                                     'held_out': held_out.keys[matched[position]],
                                     'distance': int(distances[position])})
      if plan.dedup == 'drop':
        continue
    yield record


def _write_verified(records: Iterable[Record], target: epath.Path,
                    result: ShardResult) -> None:
  """The records to `target`, counted in `result`: written to a temporary file of this
  attempt, read back whole, then moved into place (copied up, for a bucket). No records: no
  file, and result.file is None."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  attempt = f'{INCOMPLETE}-{uuid.uuid4().hex[:8]}'
  with tempfile.TemporaryDirectory() as scratch:
    local = (pathlib.Path(scratch) / target.name if storage.is_bucket(target)
             else pathlib.Path(str(target) + attempt))
    writer = array_record_module.ArrayRecordWriter(str(local), WRITER_OPTIONS)
    try:
      for record in records:
        writer.write(records_lib.encode_image_record(record.image, record.caption,
                                                     record.label, record.key))
        result.num_examples += 1
        result.num_with_caption += bool(record.caption)
        result.num_with_label += record.label >= 0
        result.max_label = max(result.max_label, record.label)
      if not writer.ok():
        raise OSError(f'Writing {target} failed.')
    finally:
      writer.close()
    try:
      if not result.num_examples:
        result.file = None
        return
      verify_shard(local, result.num_examples)
      if storage.is_bucket(target):
        partial = target.parent / (target.name + attempt)
        with local.open('rb') as source, partial.open('wb') as destination:
          shutil.copyfileobj(source, destination, 1 << 22)
        partial.rename(target)
      else:
        local.replace(pathlib.Path(str(target)))
    finally:
      if local.exists():
        local.unlink()


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


def _progress_path(plan: ConversionPlan, shard_name: str) -> epath.Path:
  return epath.Path(plan.output) / PROGRESS_FOLDER / f'{shard_name}.json'


def _finished_shard(plan: ConversionPlan, shard_name: str) -> ShardResult | None:
  """The record of a shard an earlier attempt of this same conversion finished, if its file
  is still there."""
  try:
    recorded = storage.read_json(str(_progress_path(plan, shard_name)), if_damaged='')
  except DamagedFileError:
    return None  # a record cut short: convert the shard again
  if not recorded or recorded.get('plan') != plan.fingerprint:
    return None
  result = ShardResult(**recorded['result'])
  if result.file is not None and not (epath.Path(plan.output) / result.file).exists():
    return None
  return result


# --- 4. Finish --------------------------------------------------------------------

def prepare_output(output: str, overwrite: bool) -> None:
  """Creates the folder. A finished conversion there is replaced only with --overwrite; an
  unfinished one (no metadata.json: a crash, a killed job) is continued where it stopped."""
  folder = epath.Path(output)
  folder.mkdir(parents=True, exist_ok=True)
  metadata = folder / records_lib.METADATA_FILE
  if not metadata.exists():
    return
  if not overwrite:
    shards = [f for f in folder.iterdir() if SHARD_NAME.match(f.name)]
    raise FileExistsError(
        f'{output!r} already holds a finished conversion ({len(shards)} shard files and '
        'metadata.json). Pass --overwrite to replace it, or choose another --output.')
  metadata.unlink()  # First: the folder reads as unfinished from here on.
  (folder / NEAR_DUPLICATES_FILE).unlink(missing_ok=True)
  _remove_conversion_files(folder, keep_shards=())


def finish_conversion(plan: ConversionPlan, results: Sequence[ShardResult]) -> dict[str, Any]:
  """Writes the near-duplicates report and then metadata.json (last, atomically: its presence
  says the conversion finished); removes what earlier attempts left. Returns the metadata."""
  results = sorted(results, key=lambda result: result.index)
  if [result.index for result in results] != list(range(plan.num_shards)):
    raise RuntimeError(f'finish_conversion got shards {[r.index for r in results]}, not all '
                       f'{plan.num_shards}.')
  written = [result for result in results if result.file is not None]
  num_examples = sum(result.num_examples for result in written)
  if not num_examples:
    raise ValueError(
        f'No examples found in {", ".join(plan.inputs)}: '
        f'{sum(r.groups_without_image for r in results)} groups had no '
        f'.jpg/.jpeg/.png/.webp member, {sum(r.undecodable_images for r in results)} images '
        f'did not decode, {sum(len(r.near_duplicates) for r in results)} were near-duplicates'
        ' of held-out images.')
  folder = epath.Path(plan.output)
  max_label = max(result.max_label for result in results)
  metadata = {
      'format': records_lib.IMAGE_FORMAT,
      'format_version': records_lib.IMAGE_FORMAT_VERSION,
      'split': plan.split,
      'input_kind': plan.input_kind,
      'num_inputs': plan.num_inputs,
      'num_examples': num_examples,
      'num_with_caption': sum(result.num_with_caption for result in written),
      'num_with_label': sum(result.num_with_label for result in written),
      'class_names': list(plan.class_names),
      'num_classes': len(plan.class_names) if plan.class_names else max_label + 1,
      'shards': [{'file': result.file, 'num_examples': result.num_examples}
                 for result in written],
      'groups_without_image': sum(result.groups_without_image for result in results),
      'undecodable_images': sum(result.undecodable_images for result in results),
      'undecodable': plan.undecodable,
      'bad_labels': sum(result.bad_labels for result in results),
      'bad_json': sum(result.bad_json for result in results),
      'truncated_tars': [os.path.basename(plan.items[result.index].tar_path)
                         for result in results if result.truncated_tar],
  }
  if plan.held_out:
    matches = [match for result in results for match in result.near_duplicates]
    metadata['near_duplicates'] = {
        'held_out': list(plan.held_out), 'max_distance': plan.max_distance,
        'dedup': plan.dedup, 'found': len(matches),
        'dropped': len(matches) if plan.dedup == 'drop' else 0,
        'report': NEAR_DUPLICATES_FILE}
    storage.write_text(str(folder / NEAR_DUPLICATES_FILE),
                       json.dumps({'max_distance': plan.max_distance, 'dedup': plan.dedup,
                                   'matches': matches}, indent=1) + '\n')
  storage.write_text(str(folder / records_lib.METADATA_FILE),
                     json.dumps(metadata, indent=2) + '\n')
  # What earlier attempts left: shards of an unfinished conversion this one does not have.
  _remove_conversion_files(folder, keep_shards={plan.shard_name(item.index)
                                                for item in plan.items})
  return metadata


def _remove_conversion_files(folder: epath.Path, keep_shards: Collection[str]) -> None:
  """The shard files not in `keep_shards`, temporary files of attempts, the per-shard
  records."""
  for file in folder.iterdir():
    if INCOMPLETE in file.name or (SHARD_NAME.match(file.name)
                                   and file.name not in keep_shards):
      file.unlink()
  if (folder / PROGRESS_FOLDER).exists():
    (folder / PROGRESS_FOLDER).rmtree()


def convert_in_process(plan: ConversionPlan) -> dict[str, Any]:
  """Steps 2 to 4 one after another in this process. Returns the metadata."""
  held_out = held_out_hashes(plan)
  results = [convert_shard(plan, item, held_out) for item in plan.items]
  return finish_conversion(plan, results)
