"""Per-example image decoding and augmentation on the host (numpy + PIL).

Every random choice takes an explicit ``np.random.Generator`` so that, inside
the Grain pipeline, augmentation is a deterministic function of the element
index and seed.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image
from PIL import ImageOps


class CorruptImageError(Exception):
  """An image that cannot be decoded (corrupt, truncated, not an image); ``path`` names it."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'Cannot decode image {path!r}: {reason}')
    self.path = path
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class SkippedExample:
  """Stands in for an example the pipeline could not load, so it can be dropped and counted."""
  path: str
  reason: str


def decode_image(path: str) -> np.ndarray:
  """Reads an image file as uint8 RGB (H, W, 3); raises CorruptImageError if unreadable.

  Grayscale, palette and CMYK images are converted to RGB; transparent images
  are composited onto white. EXIF orientation is applied.
  """
  return _decode(path, str(path))


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
  """As `decode_image`, for an encoded image held in memory (e.g. an ArrayRecord record).

  ``name`` says where the bytes came from (a record key): CorruptImageError names it.
  """
  return _decode(io.BytesIO(data), name)


def to_rgb(image: np.ndarray) -> np.ndarray:
  """An already decoded uint8 image, (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), as RGB (H, W, 3).

  The same conversions as `decode_image`: grey is repeated, transparency composited onto white.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
      image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
    raise ValueError(
        f'Expected a uint8 image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got'
        f' {image.dtype} {image.shape}.')
  if image.ndim == 3 and image.shape[-1] == 3:
    return image
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return _as_rgb_array(Image.fromarray(image))


def _decode(file, name: str) -> np.ndarray:
  try:
    with Image.open(file) as image:
      image.load()  # PIL decodes lazily: force it so truncated files fail here.
      return _as_rgb_array(ImageOps.exif_transpose(image))
  # Catch-all on purpose: the try covers only PIL reading an untrusted file, and
  # besides OSError/SyntaxError/ValueError its plugins raise struct.error,
  # IndexError, DecompressionBombError... on malformed data.
  except Exception as error:  # pylint: disable=broad-exception-caught
    raise CorruptImageError(name, f'{type(error).__name__}: {error}') from error


def _as_rgb_array(image: Image.Image) -> np.ndarray:
  """uint8 RGB (H, W, 3): palette, grey and CMYK converted, transparency composited onto white."""
  if image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  if image.mode in ('RGBA', 'LA', 'PA'):
    rgba = image.convert('RGBA')
    image = Image.new('RGB', rgba.size, (255, 255, 255))
    image.paste(rgba, mask=rgba.getchannel('A'))
  return np.asarray(image.convert('RGB'), dtype=np.uint8)


def _resize_region(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  """Resizes the (left, top, right, bottom) region of ``image`` to (size, size), bicubic."""
  resized = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC, box=box)
  return np.asarray(resized, dtype=np.uint8)


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """torchvision's RandomResizedCrop: a random area/aspect crop resized to (size, size).

  Up to 10 attempts sample the crop area uniformly in ``scale`` (fraction of
  the image area) and the aspect ratio log-uniformly in ``ratio``; if none
  fits, falls back to a centre crop with the aspect ratio clamped to ``ratio``.
  """
  height, width = image.shape[:2]
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
    crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      top = int(rng.integers(0, height - crop_height + 1))
      left = int(rng.integers(0, width - crop_width + 1))
      return _resize_region(image, (left, top, left + crop_width, top + crop_height), size)

  input_ratio = width / height
  if input_ratio < min(ratio):
    crop_width, crop_height = width, int(round(width / min(ratio)))
  elif input_ratio > max(ratio):
    crop_width, crop_height = int(round(height * max(ratio))), height
  else:
    crop_width, crop_height = width, height
  top, left = (height - crop_height) // 2, (width - crop_width) // 2
  return _resize_region(image, (left, top, left + crop_width, top + crop_height), size)


def center_crop_resize(image: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
  """Eval transform: crops a centred square, then resizes it to (size, size), bicubic.

  The square's side is ``crop_fraction`` times the shorter image side; 1.0 keeps
  the whole short side, 0.875 is the usual ImageNet "resize 256, crop 224".
  """
  height, width = image.shape[:2]
  side = max(1, int(round(min(height, width) * crop_fraction)))
  top, left = (height - side) // 2, (width - side) // 2
  return _resize_region(image, (left, top, left + side, top + side), size)


def random_horizontal_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors the image left-right with probability 0.5."""
  if rng.random() < 0.5:
    return np.ascontiguousarray(image[:, ::-1])
  return image
