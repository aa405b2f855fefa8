"""Distinct synthetic images and their near-duplicates, for perceptual-hash deduplication.

pHash sees only the coarse layout of brightness, so images that differ only in colour
are the same to it: each image here is its own random layout (a gradient, low-frequency
waves, ellipses and rectangles, mild noise), not one template recoloured.
"""

import io

import numpy as np
from PIL import Image

# What variants() removes from each side it crops, as a fraction of the side.
CROP_FRACTION = 0.03
# variants()' kinds that are within near_duplicates.DEFAULT_MAX_DISTANCE of their original for
# every image measured (500 of distinct_images(500, seed=0)): plant these where a test needs
# a near-duplicate found.
KINDS_ALWAYS_FOUND = ('jpeg_q40', 'jpeg_q75', 'png', 'resized_0.5x', 'resized_1.7x')
# Crops move the content against the frame, which pHash is least robust to: at CROP_FRACTION
# 83-93% of them are within DEFAULT_MAX_DISTANCE (8), not all (test_near_duplicates.py).
CROP_KINDS = ('crop_centre', 'crop_top_left', 'crop_bottom_right')


def distinct_images(count: int, seed: int, size: int = 96) -> list[bytes]:
  """`count` JPEGs (quality 90) of `size` x `size` random smooth RGB fields; image i is
  drawn from np.random.default_rng((seed, i)), so other seeds give unrelated images."""
  return [_jpeg(_random_field(np.random.default_rng((seed, index)), size))
          for index in range(count)]


def variants(jpeg_bytes: bytes) -> dict[str, bytes]:
  """Near-duplicates of the image `jpeg_bytes`, by kind: re-encoded as JPEG at quality 40
  and 75 and as PNG, resized to 0.5x and 1.7x, cropped by CROP_FRACTION of each side
  (centre) or of two sides (keeping the top-left or the bottom-right corner)."""
  with Image.open(io.BytesIO(jpeg_bytes)) as image:
    image = image.convert('RGB')
  width, height = image.size
  cut_x, cut_y = round(width * CROP_FRACTION), round(height * CROP_FRACTION)

  def resized(factor):
    return image.resize((round(width * factor), round(height * factor)),
                        Image.Resampling.BICUBIC)

  return {
      'jpeg_q40': _jpeg(image, quality=40),
      'jpeg_q75': _jpeg(image, quality=75),
      'png': _encoded(image, 'PNG'),
      'resized_0.5x': _jpeg(resized(0.5)),
      'resized_1.7x': _jpeg(resized(1.7)),
      'crop_centre': _jpeg(image.crop((cut_x, cut_y, width - cut_x, height - cut_y))),
      'crop_top_left': _jpeg(image.crop((0, 0, width - cut_x, height - cut_y))),
      'crop_bottom_right': _jpeg(image.crop((cut_x, cut_y, width, height))),
  }


def _random_field(rng: np.random.Generator, size: int) -> np.ndarray:
  """uint8 RGB (size, size, 3): a gradient, 2-4 waves, 2-5 ellipses or rectangles, noise."""
  y, x = np.mgrid[0:size, 0:size] / size
  field = (rng.uniform(40, 215, 3) + rng.uniform(-100, 100, 3) * x[..., None]
           + rng.uniform(-100, 100, 3) * y[..., None])
  for _ in range(rng.integers(2, 5)):
    angle, phase = rng.uniform(0, 2 * np.pi, 2)
    cycles = rng.uniform(0.5, 3)  # across the image: low frequencies, what pHash sees
    wave = np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    field += rng.uniform(20, 60) * wave[..., None] * rng.uniform(-1, 1, 3)
  for _ in range(rng.integers(2, 6)):
    centre_x, centre_y = rng.uniform(0, 1, 2)
    half_width, half_height = rng.uniform(0.08, 0.35, 2)
    if rng.random() < 0.5:
      inside = ((x - centre_x) / half_width) ** 2 + ((y - centre_y) / half_height) ** 2 <= 1
    else:
      inside = (np.abs(x - centre_x) <= half_width) & (np.abs(y - centre_y) <= half_height)
    field[inside] = rng.uniform(0, 255, 3)
  field += rng.normal(0, 4, field.shape)
  return np.clip(np.round(field), 0, 255).astype(np.uint8)


def _jpeg(pixels_or_image, quality: int = 90) -> bytes:
  return _encoded(pixels_or_image, 'JPEG', quality=quality)


def _encoded(pixels_or_image, image_format: str, **save_options) -> bytes:
  image = (pixels_or_image if isinstance(pixels_or_image, Image.Image)
           else Image.fromarray(pixels_or_image))
  buffer = io.BytesIO()
  image.save(buffer, format=image_format, **save_options)
  return buffer.getvalue()
