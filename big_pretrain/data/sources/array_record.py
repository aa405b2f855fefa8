"""The 'array_record' source: the converter's shards of encoded images, with caption and label.

`python -m big_pretrain.data.convert` writes a folder of image records
(data/records.py) and its metadata.json; this source reads them back with
random access, through Grain's ArrayRecord reader.
"""

from __future__ import annotations

import glob
import pathlib
from typing import Any, Sequence

from absl import logging

from big_pretrain.data import records
from big_pretrain.data.sources.source import PathSource
from big_pretrain.data.transforms import DAMAGED_RECORD
from big_pretrain.data.text import labels as labels_lib
from big_pretrain.errors import DamagedFileError
from big_pretrain.storage import files as storage

_CONVERT_HINT = (
    'Convert an image folder or webdataset tar shards with `python -m big_pretrain.data.convert'
    ' --input=DIR_OR_TARS --output=DIR`, then set config.data.path=DIR.')


def read_array_record_metadata(directory: str | pathlib.Path) -> dict[str, Any] | None:
  """The converter's metadata.json in ``directory``, or None if there is none."""
  metadata_path = pathlib.Path(directory) / records.METADATA_FILE
  metadata = storage.read_json(
      str(metadata_path), if_damaged='The converter writes it last, and it lists the shards. '
      f'Copy the folder again, or convert again. {_CONVERT_HINT}')
  if metadata is None:
    return None
  version = metadata.get('format_version')
  if metadata.get('format') != records.IMAGE_FORMAT or version != records.IMAGE_FORMAT_VERSION:
    raise DamagedFileError(
        f'{metadata_path} is not metadata of this version of the converter (format'
        f' {metadata.get("format")!r} version {version!r}; expected {records.IMAGE_FORMAT!r}'
        f' version {records.IMAGE_FORMAT_VERSION}). {_CONVERT_HINT}')
  return metadata


def array_record_shards(path: str | Sequence[str]) -> tuple[list[str], dict[str, Any] | None]:
  """The shard files of ``path`` (a converted folder, a glob, a shard or a list), and metadata.

  The metadata is that of the converted folder, or of the folder that holds
  all the shards, when it has a metadata.json; None otherwise.
  """
  if not isinstance(path, (str, pathlib.Path)):
    shards = [str(pathlib.Path(p).expanduser()) for p in path]
    if not shards:
      raise ValueError(f'Empty list of ArrayRecord shards. {_CONVERT_HINT}')
    for shard in shards:
      if not pathlib.Path(shard).is_file():
        raise FileNotFoundError(f'ArrayRecord shard {shard!r} does not exist. {_CONVERT_HINT}')
  else:
    root = pathlib.Path(path).expanduser()
    if glob.has_magic(str(root)):
      shards = sorted(glob.glob(str(root)))
      if not shards:
        raise FileNotFoundError(
            f'No ArrayRecord shard matches {str(path)!r}. Set config.data.path to a folder'
            f' written by the converter, or a glob of its shards. {_CONVERT_HINT}')
    elif root.is_dir():
      return _converted_folder_shards(root)
    elif root.is_file():
      shards = [str(root)]
    else:
      raise FileNotFoundError(
          f'ArrayRecord path {str(path)!r} does not exist. Set config.data.path to a folder'
          f' of ArrayRecord shards. {_CONVERT_HINT}')
  folders = {pathlib.Path(shard).parent for shard in shards}
  return shards, read_array_record_metadata(folders.pop()) if len(folders) == 1 else None


def _converted_folder_shards(root: pathlib.Path) -> tuple[list[str], dict[str, Any]]:
  """The shards listed in a converted folder's metadata.json, checked to be all there."""
  metadata = read_array_record_metadata(root)
  if metadata is None:
    if any(root.glob(f'*{records.ARRAY_RECORD_SUFFIX}*')):
      raise ValueError(
          f'{str(root)!r} holds ArrayRecord shards but no {records.METADATA_FILE}: the'
          ' conversion did not finish (the converter writes it last). Run the converter'
          ' again with --overwrite, or give config.data.path as a glob of the shards'
          f' ({str(root / ("*" + records.ARRAY_RECORD_SUFFIX))!r}) to read them as they are.')
    raise FileNotFoundError(
        f'No ArrayRecord shards (*{records.ARRAY_RECORD_SUFFIX}) in {str(root)!r}. {_CONVERT_HINT}')
  shards = [str(root / shard['file']) for shard in metadata.get('shards') or ()]
  if not shards:
    raise ValueError(f'{str(root / records.METADATA_FILE)!r} lists no shards. {_CONVERT_HINT}')
  missing = [shard for shard in shards if not pathlib.Path(shard).is_file()]
  if missing:
    raise FileNotFoundError(
        f'{len(missing)} of the {len(shards)} shards listed in'
        f' {str(root / records.METADATA_FILE)!r} are missing (first: {missing[0]!r}). Copy'
        f' the whole folder, or convert again. {_CONVERT_HINT}')
  return shards, {**metadata, 'folder': str(root)}


class ArrayRecordSource(PathSource):
  """ArrayRecord shards of encoded images with caption and label, Grain's random-access format.

  ``path`` is a folder written by ``python -m big_pretrain.data.convert`` (its
  ``metadata.json`` lists the shards and class names), a glob of shards, one
  shard, or a list of shards. Examples are in shard order, records in file
  order. Images are not decoded here: examples hold the encoded 'image_bytes',
  and the pipeline decodes them, skipping and counting corrupt images as it
  does image files.
  """

  name = 'array_record'
  path_holds = ('a folder of ArrayRecord shards written by `python -m'
                ' big_pretrain.data.convert`')
  path_hint = ('Point it at a folder written by `python -m big_pretrain.data.convert '
               '--input=IMAGES_OR_TARS --output=DIR`, e.g. --config.data.path=DIR.')

  @classmethod
  def check_has_data(cls, location: str) -> None:
    array_record_shards(location)

  def __init__(self, path: str | Sequence[str]):
    shards, metadata = array_record_shards(path)
    self._records = open_shards(
        shards, if_damaged='Copy it again from where it was converted, or convert again. '
        + _CONVERT_HINT)
    self._shards = shards
    if metadata is None:
      logging.warning('No %s beside the ArrayRecord shards %s: no class names, num_classes=0.',
                      records.METADATA_FILE, shards[0])
      metadata = {}
    names = [str(name) for name in metadata.get('class_names') or ()]
    self.num_classes = int(metadata.get('num_classes', len(names)))
    # The image folder's class names; '0', '1', ... when the labels came without names.
    self.class_names = names or [str(label) for label in range(self.num_classes)]
    if not len(self._records):  # pylint: disable=g-explicit-length-test
      raise ValueError(f'The ArrayRecord shards {shards[:3]} hold no records. {_CONVERT_HINT}')
    if 'folder' in metadata and metadata.get('num_examples') != len(self._records):
      raise ValueError(
          f'{str(pathlib.Path(metadata["folder"]) / records.METADATA_FILE)!r} says'
          f' {metadata.get("num_examples")} examples, but its shards hold {len(self._records)}:'
          f' the folder changed after the conversion. Convert again. {_CONVERT_HINT}')
    self[0]  # pylint: disable=pointless-statement  # Fails now if these are not our records.

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      record = self._records[int(index)]
    except RuntimeError as error:  # a block or chunk whose bytes fail their own hash
      reason = str(error).splitlines()[0] if str(error) else type(error).__name__
      return {'key': f'record {int(index)}, {self._where(int(index))}', 'caption': '',
              'label': -1, 'hashtags': [], DAMAGED_RECORD: reason}
    try:
      example = records.decode_image_record(record)
    except ValueError as error:
      raise ValueError(
          f'Record {int(index)} ({self._where(int(index))}) is {error}. ArrayRecord sources read'
          f' the records written by the converter. {_CONVERT_HINT}') from error
    example['hashtags'] = labels_lib.caption_hashtags(example['caption'])
    return example

  def _where(self, index: int) -> str:
    """The shard and position of a record, for error messages."""
    try:  # A private helper of array_record's data source; only used to name the file.
      reader, position = self._records._reader_idx_and_position(index)  # pylint: disable=protected-access
      return f'position {position} of {self._shards[reader]}'
    except Exception:  # pylint: disable=broad-exception-caught
      return f'in one of {self._shards[:3]}{"..." if len(self._shards) > 3 else ""}'


def open_shards(shards: Sequence[str], *, if_damaged: str):
  """Grain's random-access reader of `shards`; DamagedFileError naming the first shard that
  is not a whole ArrayRecord file (cut short by a copy that did not finish, say), followed by
  `if_damaged`: what to do."""
  import grain  # pylint: disable=g-import-not-at-top  # Only needed here; slow to import.
  try:
    return grain.sources.ArrayRecordDataSource(list(shards))
  except (RuntimeError, ValueError) as error:
    raise DamagedFileError(
        f'{_first_unreadable(shards)} cannot be read: it is not a whole ArrayRecord file '
        f'({str(error).splitlines()[0] if str(error) else type(error).__name__}). {if_damaged}'
    ) from error


def _first_unreadable(shards: Sequence[str]) -> str:
  """The first shard that array_record cannot open (its own message may not name it)."""
  # pylint: disable-next=g-import-not-at-top
  from array_record.python import array_record_module
  for shard in shards:
    try:
      reader = array_record_module.ArrayRecordReader(shard)
      usable = reader.ok()
      reader.close()
    except Exception:  # pylint: disable=broad-exception-caught
      usable = False
    if not usable or pathlib.Path(shard).stat().st_size == 0:
      return f'ArrayRecord shard {shard}'
  return f'One of the ArrayRecord shards {list(shards[:3])}{"..." if len(shards) > 3 else ""}'
