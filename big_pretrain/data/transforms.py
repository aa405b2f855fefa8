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


# A source's example for a record it could not read (its bytes fail their own hash) holds
# the reason under this key, and 'key' says where; the decoding maps skip it.
DAMAGED_RECORD = 'damaged_record'


@dataclasses.dataclass(frozen=True)
class SkippedExample:
  """Stands in for an example the pipeline could not load, so it can be dropped and counted:
  an image that does not decode, or (`damaged_record`) a record whose bytes fail their own
  hash in the file (an ArrayRecord block or chunk damaged on disk)."""
  path: str
  reason: str
  damaged_record: bool = False


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
  return np.asarray(_as_rgb_image(image), dtype=np.uint8)


def _as_rgb_image(image: Image.Image) -> Image.Image:
  """`image` in mode RGB: palette, grey and CMYK converted, transparency composited onto white."""
  if image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  if image.mode in ('RGBA', 'LA', 'PA'):
    rgba = image.convert('RGBA')
    image = Image.new('RGB', rgba.size, (255, 255, 255))
    image.paste(rgba, mask=rgba.getchannel('A'))
  return image.convert('RGB')


def _resize_region(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  """Resizes the (left, top, right, bottom) region of ``image`` to (size, size), bicubic."""
  resized = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC, box=box)
  return np.asarray(resized, dtype=np.uint8)


def sample_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop window (left, top, right, bottom) in a (height, width) image.

  Up to 10 attempts sample the crop area uniformly in ``scale`` (fraction of
  the image area) and the aspect ratio log-uniformly in ``ratio``; if none
  fits, falls back to a centre crop with the aspect ratio clamped to ``ratio``.
  """
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
      return left, top, left + crop_width, top + crop_height

  input_ratio = width / height
  if input_ratio < min(ratio):
    crop_width, crop_height = width, int(round(width / min(ratio)))
  elif input_ratio > max(ratio):
    crop_width, crop_height = int(round(height * max(ratio))), height
  else:
    crop_width, crop_height = width, height
  top, left = (height - crop_height) // 2, (width - crop_width) // 2
  return left, top, left + crop_width, top + crop_height


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """torchvision's RandomResizedCrop: a random area/aspect crop (sample_crop_box) resized to
  (size, size), bicubic."""
  height, width = image.shape[:2]
  return _resize_region(image, sample_crop_box(height, width, rng, scale, ratio), size)


# JPEG decodes at 1/2, 1/4 or 1/8 of its size for a fraction of the work (libjpeg's DCT
# scaling, PIL's draft mode).
JPEG_DECODE_REDUCTIONS = (8, 4, 2)
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # rotated by 90 degrees: width and height swap


def decode_reduction(box: tuple[int, int, int, int], size: int) -> int:
  """The largest JPEG decode reduction that leaves the crop ``box`` at least ``size`` pixels
  on each side, so the crop is still downscaled (never upscaled) to (size, size); 1: none."""
  shorter = min(box[2] - box[0], box[3] - box[1])
  return next((r for r in JPEG_DECODE_REDUCTIONS if shorter >= r * size), 1)


def decode_random_resized_crop(
    path_or_bytes: str | bytes,
    name: str,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """decode_image then random_resized_crop, a JPEG decoded only at the scale its crop needs.

  The crop box is drawn from the header's size (after EXIF orientation) with the same
  draws of ``rng`` as random_resized_crop. A JPEG whose crop window is at least 2, 4 or 8
  times ``size`` on its shorter side is decoded at 1/2, 1/4 or 1/8 of its size (PIL's
  draft mode) and the box mapped onto it: the same crop, to within half a decoded pixel,
  of a slightly differently low-passed image. Otherwise (smaller crops, other formats) the
  result is exactly random_resized_crop's on the full decode. Raises CorruptImageError
  (naming ``name``) when the file cannot be read.
  """
  source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
  try:
    with Image.open(source) as image:
      width, height = image.size
      if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
      box = sample_crop_box(height, width, rng, scale, ratio)
      reduction = decode_reduction(box, size)
      # draft() picks the largest reduction whose decode still covers the size asked for;
      # it does nothing (returns None) for other formats.
      if reduction == 1 or image.draft(
          image.mode, (image.size[0] // reduction, image.size[1] // reduction)) is None:
        reduction = 1
      image.load()  # PIL decodes lazily: force it so truncated files fail here.
      rgb = _as_rgb_image(ImageOps.exif_transpose(image))
  except Exception as error:  # pylint: disable=broad-exception-caught  # as _decode
    raise CorruptImageError(name, f'{type(error).__name__}: {error}') from error
  scaled_box = tuple(edge / reduction for edge in box)
  return np.asarray(rgb.resize((size, size), Image.Resampling.BICUBIC, box=scaled_box),
                    dtype=np.uint8)


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
