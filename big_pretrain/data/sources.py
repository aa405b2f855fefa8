"""Random-access data sources (``len`` + ``__getitem__``) for ``grain.MapDataset.source``.

Sources return per-example dicts and never decode files: decoding happens in
the pipeline, where a corrupt file can be skipped instead of crashing a run.
"""

from __future__ import annotations

import argparse
import pathlib
import re
from typing import Any, Callable, Sequence

from absl import logging
import ml_collections
import numpy as np

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
        'image_path': image_path,
        'label': self._labels[int(index)],
        'caption': caption,
        'hashtags': _HASHTAG.findall(caption),
    }


# --- Dispatch -----------------------------------------------------------------
SOURCE_NAMES = ('synthetic', 'image_folder')


def build_source(data_config) -> SyntheticShapes | ImageFolder:
  """Builds the source named by ``data_config.source``."""
  split = data_config.get('split', 'train')
  if data_config.source == 'synthetic':
    return SyntheticShapes(
        num_examples=data_config.num_examples,
        image_size=data_config.source_image_size,
        seed=data_config.seed,
        split=split,
        label=data_config.get('synthetic_label', 'shape'))
  if data_config.source == 'image_folder':
    if split == 'test':
      if not data_config.get('test_path'):
        raise ValueError(
            "Evaluators need a held-out split: set config.data.test_path to a folder of"
            " class subfolders (e.g. ImageNet's val), separate from config.data.path.")
      return ImageFolder(data_config.test_path)
    if not data_config.path:
      raise ValueError(
          "config.data.source='image_folder' needs config.data.path: set it to a"
          " folder of class subfolders, or use source='synthetic'.")
    return ImageFolder(data_config.path)
  raise ValueError(
      f'Unknown data source {data_config.source!r}; config.data.source must be one'
      f' of {", ".join(repr(name) for name in SOURCE_NAMES)}.')


# --- Reading a source's texts (the vocabulary and tokenizer build commands) ---
DEFAULT_SYNTHETIC_EXAMPLES = 50_000


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags that pick the examples a build command reads."""
  parser.add_argument('--source', required=True, choices=SOURCE_NAMES)
  parser.add_argument('--path', help='image_folder: the folder of class subfolders (captions'
                      ' are .txt files beside the images).')
  parser.add_argument(
      '--num_examples', type=int, default=None,
      help=f'synthetic: how many examples to read (default: {DEFAULT_SYNTHETIC_EXAMPLES}).'
      ' image_folder: read only N images, evenly spaced over the sorted files so every'
      ' class is represented (default: all).')
  # Synthetic texts are drawn before anything that depends on the image size,
  # so the smallest images give the same texts, fastest.
  parser.add_argument('--source_image_size', type=int, default=16,
                      help='synthetic: size of the generated images (does not change the texts).')
  parser.add_argument('--seed', type=int, default=0, help='synthetic: the dataset seed.')


def read_source_texts(args: argparse.Namespace,
                      parser: argparse.ArgumentParser) -> list[dict[str, Any]]:
  """The 'hashtags' and 'caption' of the examples picked by `add_source_arguments` flags."""
  if args.source == 'image_folder' and not args.path:
    parser.error('--source=image_folder needs --path=DIR, a folder of class subfolders.')
  if args.num_examples is not None and args.num_examples < 1:
    parser.error(f'--num_examples must be positive, got {args.num_examples}.')
  synthetic_examples = (args.num_examples if args.source == 'synthetic' and args.num_examples
                        else DEFAULT_SYNTHETIC_EXAMPLES)
  source = build_source(ml_collections.ConfigDict(dict(
      source=args.source, path=args.path, seed=args.seed, split='train',
      num_examples=synthetic_examples, source_image_size=args.source_image_size)))
  indices = range(len(source))
  if args.num_examples is not None and args.num_examples < len(source):
    indices = np.unique(np.linspace(0, len(source) - 1, args.num_examples).astype(int))
  texts = []
  for index in indices:
    example = source[int(index)]
    texts.append({'hashtags': list(example.get('hashtags') or ()),
                  'caption': example.get('caption') or ''})
  return texts
