"""The embedded synthetic source: coloured shapes on textured backgrounds, needing no files.

Every example is drawn from its index, so the source has any length and is the
same on every machine; its captions and hashtags name the shape, colour, size
and background, so WSP, FLIP and the text commands have text to read.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from big_pretrain import schema
from big_pretrain.data.sources.source import RegisteredSource

# Masks take coordinates normalized to the shape's half-extent (the shape's
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

# Example i of a split is drawn from the random stream (seed, i, *_SPLIT_STREAMS[split]).
_SPLIT_STREAMS = {'train': (), 'test': (1,)}
SYNTHETIC_LABELS = ('shape', 'colour')
# config.data.num_examples's default, and how many examples the vocabulary build reads.
DEFAULT_NUM_EXAMPLES = 50_000

# The keys of config.data this source reads beside the shared ones (data_config.py).
DATA_KEYS = schema.Group(
    'the embedded synthetic shapes',
    num_examples=schema.Key(DEFAULT_NUM_EXAMPLES, schema.COUNT,
                            'synthetic only: the examples of the training split'),
    source_image_size=schema.Key(64, schema.at_least(8, integer=True),
                                 'synthetic only: the size of the generated images'),
    synthetic_label=schema.Key('shape', schema.one_of(*SYNTHETIC_LABELS),
                               "synthetic only: the class label, 'shape' or 'colour'"),
)


class SyntheticShapes(RegisteredSource):
  """Coloured shapes on textured backgrounds, generated from the example index.

  Needs no files or network. The label is the shape (``index % num_classes``,
  so classes are exactly balanced); colour, size, position and background are
  drawn independently of it, so only the shape identity predicts the label.
  Example ``i`` is a pure function of ``(seed, split, i)``: the 'test' split
  draws from a separate random stream, so it never repeats a training image.
  """

  name = 'synthetic'
  data_keys = DATA_KEYS

  @classmethod
  def from_config(cls, data, split: str) -> SyntheticShapes:
    return cls(num_examples=data.num_examples, image_size=data.source_image_size,
               seed=data.seed, split=split, label=data.synthetic_label)

  def __init__(self, num_examples: int, image_size: int = 64, seed: int = 0,
               split: str = 'train', label: str = 'shape'):
    if split not in _SPLIT_STREAMS:
      raise ValueError(f'Unknown split {split!r}; choose one of {tuple(_SPLIT_STREAMS)}.')
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
    self._stream = _SPLIT_STREAMS[split]
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
    rng = self._example_rng(index)
    size = self._image_size
    index = int(index)

    label = index % len(_SHAPES)
    shape_name, mask_fn = _SHAPES[label]
    colour_id, background_id, size_id = self._draw_text_attributes(rng)
    min_extent, max_extent = SIZES[size_id][1]

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

    return {
        'key': f'synthetic/{self._split}/{index}',
        'image': np.clip(image, 0, 255).astype(np.uint8),
        'label': label if self._label == 'shape' else colour_id,
        **_texts(shape_name, colour_id, background_id, size_id),
    }

  def texts(self, index: int) -> dict[str, Any]:
    """The 'caption' and 'hashtags' of example `index`, as ``self[index]`` has them, without
    drawing its image (3x faster at 16 pixels): what the vocabulary commands read."""
    colour_id, background_id, size_id = self._draw_text_attributes(self._example_rng(index))
    return _texts(SHAPE_NAMES[int(index) % len(_SHAPES)], colour_id, background_id, size_id)

  def _example_rng(self, index: int) -> np.random.Generator:
    index = int(index)
    if not 0 <= index < self._num_examples:
      raise IndexError(
          f'Index {index} out of range for SyntheticShapes of length {self._num_examples}.')
    return np.random.default_rng((self._seed, index, *self._stream))

  def _draw_text_attributes(self, rng: np.random.Generator) -> tuple[int, int, int]:
    """(colour, background, size) ids: an example's first draws, before anything that depends
    on the image size, so its text is the same at every image size."""
    colour_id = int(rng.integers(len(PALETTE)))
    background_id = int(rng.choice(self._background_choices[colour_id]))
    size_id = int(rng.integers(len(SIZES)))
    return colour_id, background_id, size_id


def _texts(shape_name: str, colour_id: int, background_id: int, size_id: int) -> dict[str, Any]:
  colour_name, background_name = PALETTE[colour_id][0], PALETTE[background_id][0]
  size_name = SIZES[size_id][0]
  return {
      'caption': f'a {size_name} {colour_name} {shape_name} on a {background_name} background',
      'hashtags': [f'#{shape_name}', f'#{colour_name}', f'#{size_name}',
                   f'#{background_name}_background'],
  }
