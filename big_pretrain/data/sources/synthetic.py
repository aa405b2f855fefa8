"""Random-access data sources (``len`` + ``__getitem__``) for ``grain.MapDataset.source``.

Sources return per-example dicts and never decode files: decoding happens in
the pipeline, where a corrupt file can be skipped instead of crashing a run.
"""

from __future__ import annotations

import argparse
import glob
import json
import pathlib
import re
from typing import Any, Callable, Sequence

from absl import logging
import ml_collections
import numpy as np

from big_pretrain.data import records, transforms

# --- Synthetic shapes --------------------------------------------------------
# Masks take coordinates normalised to the shape's half-extent (the shape's
# bounding box is [-1, 1]^2) and return a boolean array.
MaskFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _circle(u, v):
  return u * u + v * v <= 1.0


def _square(u, v):
  return np.maximum(np.abs(u), np.abs(v)) <= 0.85


def _triangle(u, v):  # Pointing up (image rows grow downwards).
  return (v >= -1.0) & (v <= 0.75) & (np.abs(u) <= (v + 1.0) * 0.6)


def _diamond(u, v):
  return np.abs(u) + np.abs(v) <= 1.0


def _ring(u, v):
  radius_sq = u * u + v * v
  return (radius_sq >= 0.36) & (radius_sq <= 1.0)


def _plus(u, v):
  return ((np.abs(u) <= 0.28) & (np.abs(v) <= 1.0)) | (
      (np.abs(v) <= 0.28) & (np.abs(u) <= 1.0))


def _cross(u, v):
  a, b = (u + v) * np.sqrt(0.5), (u - v) * np.sqrt(0.5)
  return ((np.abs(a) <= 0.25) & (np.abs(b) <= 1.0)) | (
      (np.abs(b) <= 0.25) & (np.abs(a) <= 1.0))


def _crescent(u, v):
  return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.64)


def _frame(u, v):
  extent = np.maximum(np.abs(u), np.abs(v))
  return (extent >= 0.6) & (extent <= 0.9)


def _star(u, v):
  # Five lobes, one pointing up (angle -pi/2 in image coordinates).
  angle = np.arctan2(v, u)
  lobes = 0.5 * (1.0 + np.cos(5.0 * (angle + np.pi / 2)))
  return np.sqrt(u * u + v * v) <= 0.4 + 0.6 * lobes


_SHAPES: tuple[tuple[str, MaskFn], ...] = (
    ('circle', _circle),
    ('square', _square),
    ('triangle', _triangle),
    ('diamond', _diamond),
    ('ring', _ring),
    ('plus', _plus),
    ('cross', _cross),
    ('crescent', _crescent),
    ('frame', _frame),
    ('star', _star),
)
SHAPE_NAMES: tuple[str, ...] = tuple(name for name, _ in _SHAPES)

PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ('red', (220, 40, 40)),
    ('orange', (245, 140, 30)),
    ('yellow', (240, 215, 50)),
    ('green', (50, 170, 70)),
    ('cyan', (60, 200, 210)),
    ('blue', (45, 80, 220)),
    ('purple', (140, 60, 190)),
    ('pink', (240, 130, 180)),
    ('white', (245, 245, 245)),
    ('gray', (128, 128, 128)),
    ('black', (25, 25, 25)),
)

# Half-extent of the shape as a fraction of the image side.
SIZES: tuple[tuple[str, tuple[float, float]], ...] = (
    ('small', (0.12, 0.18)),
    ('medium', (0.20, 0.28)),
    ('large', (0.30, 0.40)),
)

# Backgrounds closer than this (L1 distance in RGB) to the shape colour are not
# used, so the shape always stands out from the background.
_MIN_BACKGROUND_CONTRAST = 150
_NOISE_STD = 6.0
_GRADIENT_AMPLITUDE = 20.0


SPLITS = ('train', 'test')
SYNTHETIC_LABELS = ('shape', 'colour')


class SyntheticShapes:
  """Coloured shapes on textured backgrounds, generated from the example index.

  Needs no files or network. The label is the shape (``index % num_classes``,
  so classes are exactly balanced); colour, size, position and background are
  drawn independently of it, so only the shape identity predicts the label.
  Example ``i`` is a pure function of ``(seed, split, i)``: the 'test' split
  draws from a separate random stream, so it never repeats a training image.
  """

  def __init__(self, num_examples: int, image_size: int = 64, seed: int = 0,
               split: str = 'train', label: str = 'shape'):
    if split not in SPLITS:
      raise ValueError(f'Unknown split {split!r}; choose one of {SPLITS}.')
    if label not in SYNTHETIC_LABELS:
      raise ValueError(f'Unknown synthetic label {label!r}; choose one of {SYNTHETIC_LABELS}.')
    # Which attribute is the class label: the shape (hard for small models at
    # low resolution) or the shape's colour (easy). Pixels and text are the same.
    self._label = label
    if num_examples <= 0:
      raise ValueError(f'num_examples must be positive, got {num_examples}.')
    if image_size < 16:
      raise ValueError(
          f'image_size must be at least 16 pixels for the shapes to be'
          f' recognisable, got {image_size}.')
    self._num_examples = num_examples
    self._image_size = image_size
    self._seed = seed
    self._split = split
    # The training stream is (seed, index), the test stream (seed, index, 1).
    self._stream = () if split == 'train' else (SPLITS.index(split),)
    # Pixel-centre coordinates, shared by every example.
    self._ys, self._xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    colours = np.array([rgb for _, rgb in PALETTE], dtype=np.int32)
    self._background_choices = tuple(
        np.flatnonzero(np.abs(colours - colour).sum(axis=1) >= _MIN_BACKGROUND_CONTRAST)
        for colour in colours)

  def __len__(self) -> int:
    return self._num_examples

  @property
  def class_names(self) -> list[str]:
    if self._label == 'colour':
      return [name for name, _ in PALETTE]
    return list(SHAPE_NAMES)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self._num_examples:
      raise IndexError(
          f'Index {index} out of range for SyntheticShapes of length {self._num_examples}.')
    rng = np.random.default_rng((self._seed, index, *self._stream))
    size = self._image_size

    label = index % len(_SHAPES)
    shape_name, mask_fn = _SHAPES[label]
    colour_id = int(rng.integers(len(PALETTE)))
    background_id = int(rng.choice(self._background_choices[colour_id]))
    size_id = int(rng.integers(len(SIZES)))
    size_name, (min_extent, max_extent) = SIZES[size_id]

    half_extent = rng.uniform(min_extent, max_extent) * size
    centre_x, centre_y = rng.uniform(half_extent, size - half_extent, size=2)
    mask = mask_fn((self._xs - centre_x) / half_extent, (self._ys - centre_y) / half_extent)

    # Background: flat colour plus a gentle linear gradient in a random direction.
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-6
    gradient = ((self._xs * direction[0] + self._ys * direction[1]) / size - 0.5) * (
        2 * _GRADIENT_AMPLITUDE)
    background = np.asarray(PALETTE[background_id][1], np.float32) + gradient[..., None]
    colour = np.asarray(PALETTE[colour_id][1], np.float32)
    image = np.where(mask[..., None], colour, background)
    image += rng.normal(0.0, _NOISE_STD, size=image.shape).astype(np.float32)

    colour_name = PALETTE[colour_id][0]
    background_name = PALETTE[background_id][0]
    return {
        'key': f'synthetic/{self._split}/{index}',
        'image': np.clip(image, 0, 255).astype(np.uint8),
        'label': label if self._label == 'shape' else colour_id,
        'caption': f'a {size_name} {colour_name} {shape_name} on a {background_name} background',
        'hashtags': [f'#{shape_name}', f'#{colour_name}', f'#{size_name}',
                     f'#{background_name}_background'],
    }


# --- Image folder ------------------------------------------------------------
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
_HASHTAG = re.compile(r'#\w+')


class ImageFolder:
  """A folder of class subfolders: ``path/<class_name>/**/<image>``.

  Class ids follow the sorted subfolder names. An optional caption is read from
  a ``.txt`` file with the same stem next to each image. Files are listed once,
  sorted, so the example order is deterministic. Images are not decoded here.
  """

  def __init__(self, path: str, extensions: Sequence[str] = IMAGE_EXTENSIONS):
    root = pathlib.Path(path).expanduser()
    if not root.exists():
      raise FileNotFoundError(
          f'Image folder {str(path)!r} does not exist. Set config.data.path to a'
          ' folder of class subfolders (path/<class_name>/<images>), or use'
          " source='synthetic'.")
    if not root.is_dir():
      raise NotADirectoryError(
          f'{str(path)!r} is a file, not a folder. Set config.data.path to a folder'
          ' of class subfolders (path/<class_name>/<images>).')
    extensions = tuple(ext.lower() for ext in extensions)

    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith('.'))
    image_paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
      class_images = sorted(
          f for f in class_dir.rglob('*')
          if f.suffix.lower() in extensions and f.is_file() and not f.name.startswith('.'))
      if not class_images:
        logging.warning('Class folder %s has no images; its label %d will never appear.',
                        class_dir, label)
      image_paths.extend(str(f) for f in class_images)
      labels.extend([label] * len(class_images))
    if not image_paths:
      raise ValueError(
          f'No images found in class subfolders of {str(root)!r} (found'
          f' {len(class_dirs)} subfolders). Expected path/<class_name>/<image> files'
          f' with one of the extensions {", ".join(extensions)}.')

    self._root = root
    self._root_prefix = str(root) + '/'
    self._class_names = [d.name for d in class_dirs]
    self._image_paths = tuple(image_paths)
    self._labels = tuple(labels)

  def __len__(self) -> int:
    return len(self._image_paths)

  @property
  def class_names(self) -> list[str]:
    return list(self._class_names)

  @property
  def num_classes(self) -> int:
    return len(self._class_names)

  def __getitem__(self, index: int) -> dict[str, Any]:
    image_path = self._image_paths[int(index)]
    try:
      # errors='replace': a badly encoded caption must not stop training.
      caption = pathlib.Path(image_path).with_suffix('.txt').read_text(
          encoding='utf-8', errors='replace').strip()
    except FileNotFoundError:
      caption = ''
    return {
        'key': image_path[len(self._root_prefix):],  # The path under the folder.
        'image_path': image_path,
        'label': self._labels[int(index)],
        'caption': caption,
        'hashtags': _HASHTAG.findall(caption),
    }


# --- ArrayRecord shards ---------------------------------------------------------
# Written by `python -m big_pretrain.data.convert`: each record is a serialized
# tf.train.Example holding the original encoded image and its text and label.
ARRAY_RECORD_SUFFIX = '.array_record'
ARRAY_RECORD_METADATA = 'metadata.json'
ARRAY_RECORD_FORMAT = 'big_pretrain.array_record'
ARRAY_RECORD_FORMAT_VERSION = 1
_CONVERT_HINT = (
    'Convert an image folder or webdataset tar shards with `python -m big_pretrain.data.convert'
    ' --input=DIR_OR_TARS --output=DIR`, then set config.data.path=DIR.')


def encode_record(image_bytes: bytes, caption: str, label: int, key: str) -> bytes:
  """One ArrayRecord record: a serialized tf.train.Example (see ArrayRecordSource)."""
  return records.encode_example(
      bytes_features={'image': [image_bytes], 'caption': [caption.encode('utf-8')],
                      'key': [key.encode('utf-8')]},
      int64_features={'label': [label]})


def decode_record(record: bytes) -> dict[str, Any]:
  """The example of an `encode_record` record; raises ValueError if it is not one."""
  feature = records.decode_example(record)
  if not feature.get('image'):
    raise ValueError(
        "a tf.train.Example without an 'image' bytes feature (features:"
        f' {sorted(feature)})')

  def text(name: str) -> str:
    values = feature.get(name)
    return values[0].decode('utf-8', errors='replace') if values else ''

  labels = feature.get('label')
  return {'image_bytes': feature['image'][0],
          'label': int(labels[0]) if labels else -1,
          'caption': text('caption'),
          'key': text('key')}


def read_array_record_metadata(directory: str | pathlib.Path) -> dict[str, Any] | None:
  """The converter's metadata.json in ``directory``, or None if there is none."""
  metadata_path = pathlib.Path(directory) / ARRAY_RECORD_METADATA
  try:
    text = metadata_path.read_text(encoding='utf-8')
  except FileNotFoundError:
    return None
  try:
    metadata = json.loads(text)
  except json.JSONDecodeError as error:
    raise ValueError(f'{str(metadata_path)!r} is not valid JSON ({error}). {_CONVERT_HINT}'
                     ) from error
  version = metadata.get('format_version')
  if metadata.get('format') != ARRAY_RECORD_FORMAT or version != ARRAY_RECORD_FORMAT_VERSION:
    raise ValueError(
        f'{str(metadata_path)!r} is not metadata of this version of the converter (format'
        f' {metadata.get("format")!r} version {version!r}; expected {ARRAY_RECORD_FORMAT!r}'
        f' version {ARRAY_RECORD_FORMAT_VERSION}). {_CONVERT_HINT}')
  return metadata


def _array_record_shards(path: str | Sequence[str]) -> tuple[list[str], dict[str, Any] | None]:
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
    if any(root.glob(f'*{ARRAY_RECORD_SUFFIX}*')):
      raise ValueError(
          f'{str(root)!r} holds ArrayRecord shards but no {ARRAY_RECORD_METADATA}: the'
          ' conversion did not finish (the converter writes it last). Run the converter'
          ' again with --overwrite, or give config.data.path as a glob of the shards'
          f' ({str(root / ("*" + ARRAY_RECORD_SUFFIX))!r}) to read them as they are.')
    raise FileNotFoundError(
        f'No ArrayRecord shards (*{ARRAY_RECORD_SUFFIX}) in {str(root)!r}. {_CONVERT_HINT}')
  shards = [str(root / shard['file']) for shard in metadata.get('shards') or ()]
  if not shards:
    raise ValueError(f'{str(root / ARRAY_RECORD_METADATA)!r} lists no shards. {_CONVERT_HINT}')
  missing = [shard for shard in shards if not pathlib.Path(shard).is_file()]
  if missing:
    raise FileNotFoundError(
        f'{len(missing)} of the {len(shards)} shards listed in'
        f' {str(root / ARRAY_RECORD_METADATA)!r} are missing (first: {missing[0]!r}). Copy'
        f' the whole folder, or convert again. {_CONVERT_HINT}')
  return shards, {**metadata, 'folder': str(root)}


class ArrayRecordSource:
  """ArrayRecord shards of encoded images with caption and label, Grain's random-access format.

  ``path`` is a folder written by ``python -m big_pretrain.data.convert`` (its
  ``metadata.json`` lists the shards and class names), a glob of shards, one
  shard, or a list of shards. Examples are in shard order, records in file
  order. Images are not decoded here: examples hold the encoded 'image_bytes',
  and the pipeline decodes them, skipping and counting corrupt images as it
  does image files.
  """

  def __init__(self, path: str | Sequence[str]):
    import grain  # pylint: disable=g-import-not-at-top  # Only needed here; slow to import.
    shards, metadata = _array_record_shards(path)
    try:
      self._records = grain.sources.ArrayRecordDataSource(shards)
    except (RuntimeError, ValueError) as error:
      raise ValueError(
          f'Cannot read the ArrayRecord shards {_describe_shards(shards, error)}. {_CONVERT_HINT}'
      ) from error
    self._shards = shards
    if metadata is None:
      logging.warning('No %s beside the ArrayRecord shards %s: no class names, num_classes=0.',
                      ARRAY_RECORD_METADATA, shards[0])
      metadata = {}
    self._class_names = [str(name) for name in metadata.get('class_names') or ()]
    self._num_classes = int(metadata.get('num_classes', len(self._class_names)))
    if not len(self._records):  # pylint: disable=g-explicit-length-test
      raise ValueError(f'The ArrayRecord shards {shards[:3]} hold no records. {_CONVERT_HINT}')
    if 'folder' in metadata and metadata.get('num_examples') != len(self._records):
      raise ValueError(
          f'{str(pathlib.Path(metadata["folder"]) / ARRAY_RECORD_METADATA)!r} says'
          f' {metadata.get("num_examples")} examples, but its shards hold {len(self._records)}:'
          f' the folder changed after the conversion. Convert again. {_CONVERT_HINT}')
    self[0]  # pylint: disable=pointless-statement  # Fails now if these are not our records.

  def __len__(self) -> int:
    return len(self._records)

  @property
  def class_names(self) -> list[str]:
    """The image folder's class names; '0', '1', ... when the labels came without names."""
    return self._class_names or [str(label) for label in range(self._num_classes)]

  @property
  def num_classes(self) -> int:
    return self._num_classes

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._records[int(index)]
    try:
      example = decode_record(record)
    except ValueError as error:
      raise ValueError(
          f'Record {int(index)} ({self._where(int(index))}) is {error}. ArrayRecord sources read'
          f' the records written by the converter. {_CONVERT_HINT}') from error
    example['hashtags'] = _HASHTAG.findall(example['caption'])
    return example

  def _where(self, index: int) -> str:
    """The shard and position of a record, for error messages."""
    try:  # A private helper of array_record's data source; only used to name the file.
      reader, position = self._records._reader_idx_and_position(index)  # pylint: disable=protected-access
      return f'position {position} of {self._shards[reader]}'
    except Exception:  # pylint: disable=broad-exception-caught
      return f'in one of {self._shards[:3]}{"..." if len(self._shards) > 3 else ""}'


def _describe_shards(shards: Sequence[str], error: Exception) -> str:
  """Names the first shard that array_record cannot open (its own message may not)."""
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
      return f'{shard!r} (not an ArrayRecord file: {error})'
  return f'{list(shards[:3])}{"..." if len(shards) > 3 else ""} ({error})'


# --- TFDS ----------------------------------------------------------------------

def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "config.data.source='tfds' needs tensorflow-datasets: pip install -r requirements.txt"
    ) from error
  return tfds


class TfdsSource:
  """A TFDS dataset read with random access (`tfds.data_source`): ArrayRecord files only.

  The dataset must already be prepared in ``data_dir`` with
  ``file_format='array_record'``; nothing is downloaded. Encoded images are
  passed on undecoded ('image_bytes') so the pipeline decodes them and skips
  corrupt ones; image features that are plain arrays are passed as pixels.
  """

  def __init__(self, name: str, split: str = 'train', data_dir: str | None = None, *,
               image_key: str = 'image', label_key: str | None = 'label',
               caption_key: str | None = None, split_key: str = 'tfds_train_split'):
    tfds = _import_tfds()
    build_command = (
        f'`tfds build {name} --data_dir=DATA_DIR --file_format=array_record` (or'
        " builder.download_and_prepare(file_format='array_record'); preparing needs TensorFlow:"
        ' pip install -r requirements-tf.txt), and set config.data.tfds_data_dir=DATA_DIR.')
    prepare_hint = f'Prepare it first, in ArrayRecord format: {build_command}'
    where = f'data_dir {data_dir!r}' if data_dir else "TFDS's default data_dir"
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
      raise FileNotFoundError(
          f'TFDS dataset {name!r} is neither prepared in {where} nor a registered dataset'
          f' (config.data.tfds_name). {prepare_hint}') from error
    if not builder.is_prepared():
      raise FileNotFoundError(
          f'TFDS dataset {name!r} is not prepared in {where} (nothing is downloaded).'
          f' {prepare_hint}')
    features = builder.info.features
    if image_key not in features:
      raise ValueError(
          f'TFDS dataset {name!r} has no feature {image_key!r} (config.data.tfds_image_key);'
          f' its features are {sorted(features.keys())}.')
    if caption_key and caption_key not in features:
      raise ValueError(
          f'TFDS dataset {name!r} has no feature {caption_key!r} (config.data.tfds_caption_key);'
          f' its features are {sorted(features.keys())}.')
    if label_key and label_key not in features:
      logging.warning('TFDS dataset %r has no label feature %r: every label is -1.',
                      name, label_key)
      label_key = None
    decoders = None
    if isinstance(features[image_key], tfds.features.Image):
      decoders = {image_key: tfds.decode.SkipDecoding()}  # The pipeline decodes.
    try:
      self._data = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                    decoders=decoders)
    except NotImplementedError as error:  # Prepared, but as TFRecords: no random access.
      file_format = getattr(builder.info.file_format, 'value', builder.info.file_format)
      raise ValueError(
          f'TFDS dataset {name!r} in {where} was prepared as {file_format}, which has no'
          ' random access; Grain needs ArrayRecord. Prepare it again (in another data_dir,'
          f' or after deleting this one): {build_command}') from error
    except ValueError as error:
      if 'split' not in str(error).lower():
        raise
      raise ValueError(
          f'TFDS dataset {name!r}: bad split {split!r} (config.data.{split_key}): {error}'
      ) from error

    self._name, self._split = name, split
    self._image_key, self._label_key, self._caption_key = image_key, label_key, caption_key
    label_feature = features[label_key] if label_key else None
    self._class_names = list(getattr(label_feature, 'names', None) or ())
    self._num_classes = int(getattr(label_feature, 'num_classes', None) or 0)

  def __len__(self) -> int:
    return len(self._data)

  @property
  def class_names(self) -> list[str]:
    return self._class_names or [str(label) for label in range(self._num_classes)]

  @property
  def num_classes(self) -> int:
    return self._num_classes

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    features = self._data[index]
    image = features[self._image_key]
    example = {'key': f'{self._name}/{self._split}[{index}]'}
    if isinstance(image, (bytes, np.bytes_)):
      example['image_bytes'] = bytes(image)
    else:
      example['image'] = transforms.to_rgb(image)
    example['label'] = int(features[self._label_key]) if self._label_key else -1
    caption = features[self._caption_key] if self._caption_key else ''
    if isinstance(caption, (bytes, np.bytes_)):
      caption = bytes(caption).decode('utf-8', errors='replace')
    example['caption'] = str(caption).strip()
    example['hashtags'] = _HASHTAG.findall(example['caption'])
    return example


# --- A fixed part of a source (a labelled subset, and the unlabelled rest) -------

class SubsetSource:
  """The examples of `source` in a fixed random `fraction` of its indices, or all but those.

  The part is drawn once from `seed` (a permutation of the indices; the first
  round(fraction * len) are 'in'), so `complement=False` and `complement=True`
  split one dataset into two disjoint parts that cover it: e.g. 10% of
  ImageNet's labels, and the other 90% as unlabelled images for self-training.
  Examples keep their order, their keys and their labels.
  """

  def __init__(self, source, fraction: float, *, complement: bool = False, seed: int = 0):
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f'config.data.subset.fraction={fraction}: must be in (0, 1].')
    order = np.random.default_rng((int(seed), _SUBSET_STREAM)).permutation(len(source))
    count = int(round(fraction * len(source)))
    indices = order[count:] if complement else order[:count]
    if not len(indices):  # pylint: disable=g-explicit-length-test
      raise ValueError(
          f'config.data.subset (fraction={fraction}, complement={complement}) of a source of '
          f'{len(source)} examples is empty.')
    self._source = source
    self._indices = np.sort(indices)

  def __len__(self) -> int:
    return len(self._indices)

  @property
  def class_names(self) -> list[str]:
    return self._source.class_names

  @property
  def num_classes(self) -> int:
    return self._source.num_classes

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[int(self._indices[int(index)])]


_SUBSET_STREAM = 7  # Keeps the subset's draw apart from the synthetic images' streams.


# --- Dispatch -----------------------------------------------------------------
SOURCE_NAMES = ('synthetic', 'image_folder', 'array_record', 'tfds')
_PATH_SOURCES = {
    'image_folder': ('a folder of class subfolders', ImageFolder),
    'array_record': ('a folder of ArrayRecord shards written by `python -m'
                     ' big_pretrain.data.convert`', ArrayRecordSource),
}
Source = SyntheticShapes | ImageFolder | ArrayRecordSource | TfdsSource | SubsetSource


def check_has_data(source: str, path: str) -> None:
  """Raises FileNotFoundError or ValueError, saying why, when a local `path` of an
  'image_folder' or 'array_record' source holds no data; cheap, before any compile.

  An image folder counts as holding data once one image is found in a class
  subfolder (listing all of ImageNet would take minutes); other sources pass.
  """
  if source == 'array_record':
    _array_record_shards(path)
    return
  if source != 'image_folder':
    return
  root = pathlib.Path(path).expanduser()
  if not root.is_dir():
    what = 'is a file, not a folder' if root.exists() else 'does not exist'
    raise FileNotFoundError(
        f'Image folder {str(path)!r} {what}. Set it to a folder of class subfolders '
        "(path/<class_name>/<images>), or use source='synthetic'.")
  class_dirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith('.')]
  for class_dir in class_dirs:
    for image in class_dir.rglob('*'):
      if image.suffix.lower() in IMAGE_EXTENSIONS and not image.name.startswith('.'):
        return
  raise ValueError(
      f'No images found in class subfolders of {str(path)!r} (found {len(class_dirs)} '
      'subfolders). Expected path/<class_name>/<image> files with one of the extensions '
      f'{", ".join(IMAGE_EXTENSIONS)}.')


def build_source(data_config) -> Source:
  """Builds the source named by ``data_config.source``; its training split limited to
  ``data_config.subset``'s part when that is set."""
  source = _build_whole_source(data_config)
  subset = data_config.get('subset') or {}
  if data_config.get('split', 'train') == 'train' and (
      subset.get('fraction', 1.0) < 1.0 or subset.get('complement')):
    source = SubsetSource(source, subset['fraction'], complement=subset.get('complement', False),
                          seed=data_config.get('seed', 0))
  return source


def _build_whole_source(data_config) -> Source:
  split = data_config.get('split', 'train')
  if data_config.source == 'synthetic':
    return SyntheticShapes(
        num_examples=data_config.num_examples,
        image_size=data_config.source_image_size,
        seed=data_config.seed,
        split=split,
        label=data_config.get('synthetic_label', 'shape'))
  if data_config.source in _PATH_SOURCES:
    what, source_class = _PATH_SOURCES[data_config.source]
    if split == 'test':
      if not data_config.get('test_path'):
        raise ValueError(
            'Evaluators need a held-out split: set config.data.test_path to'
            f" {what} (e.g. ImageNet's val), separate from config.data.path.")
      return source_class(data_config.test_path)
    if not data_config.path:
      raise ValueError(
          f'config.data.source={data_config.source!r} needs config.data.path: set it to'
          f" {what}, or use source='synthetic'.")
    return source_class(data_config.path)
  if data_config.source == 'tfds':
    if not data_config.get('tfds_name'):
      raise ValueError(
          "config.data.source='tfds' needs config.data.tfds_name: the name of a TFDS dataset"
          " prepared with file_format='array_record' (and config.data.tfds_data_dir).")
    split_key = 'tfds_test_split' if split == 'test' else 'tfds_train_split'
    return TfdsSource(
        data_config.tfds_name,
        split=data_config.get(split_key) or ('validation' if split == 'test' else 'train'),
        data_dir=data_config.get('tfds_data_dir'),
        image_key=data_config.get('tfds_image_key') or 'image',
        label_key=data_config.get('tfds_label_key', 'label'),
        caption_key=data_config.get('tfds_caption_key'),
        split_key=split_key)
  raise ValueError(
      f'Unknown data source {data_config.source!r}; config.data.source must be one'
      f' of {", ".join(repr(name) for name in SOURCE_NAMES)}.')


# --- Reading a source's texts (the vocabulary and tokenizer build commands) ---
DEFAULT_SYNTHETIC_EXAMPLES = 50_000


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags that pick the examples a build command reads."""
  parser.add_argument('--source', required=True, choices=SOURCE_NAMES)
  parser.add_argument('--path', help='image_folder: the folder of class subfolders (captions'
                      ' are .txt files beside the images). array_record: the folder written by'
                      ' `python -m big_pretrain.data.convert`, or a glob of its shards.')
  parser.add_argument(
      '--num_examples', type=int, default=None,
      help=f'synthetic: how many examples to read (default: {DEFAULT_SYNTHETIC_EXAMPLES}).'
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
  if args.source in _PATH_SOURCES and not args.path:
    parser.error(f'--source={args.source} needs --path: {_PATH_SOURCES[args.source][0]}.')
  if args.source == 'tfds' and not (args.tfds_name and args.tfds_caption_key):
    parser.error('--source=tfds needs --tfds_name (a dataset prepared in ArrayRecord format)'
                 ' and --tfds_caption_key (its text feature).')
  if args.num_examples is not None and args.num_examples < 1:
    parser.error(f'--num_examples must be positive, got {args.num_examples}.')
  synthetic_examples = (args.num_examples if args.source == 'synthetic' and args.num_examples
                        else DEFAULT_SYNTHETIC_EXAMPLES)
  source = build_source(ml_collections.ConfigDict(dict(
      source=args.source, path=args.path, seed=args.seed, split='train',
      num_examples=synthetic_examples, source_image_size=args.source_image_size,
      tfds_name=getattr(args, 'tfds_name', None),
      tfds_data_dir=getattr(args, 'tfds_data_dir', None),
      tfds_train_split=getattr(args, 'tfds_split', 'train'),
      tfds_caption_key=getattr(args, 'tfds_caption_key', None))))
  indices = range(len(source))
  if args.num_examples is not None and args.num_examples < len(source):
    indices = np.unique(np.linspace(0, len(source) - 1, args.num_examples).astype(int))
  texts = []
  for index in indices:
    example = source[int(index)]
    texts.append({'hashtags': list(example.get('hashtags') or ()),
                  'caption': example.get('caption') or ''})
  return texts
